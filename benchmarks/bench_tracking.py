"""Tracking: ByteTrack against a naive tracker on the demo video's ground truth, and what tracking
costs video inference, in one run.

Quality: the demo video (60 frames, 6 objects: people crossing, a ball hidden 14 frames behind a
wall; its ground truth written with it) of --videos seeds (the same scene in other colours),
inferred with `inference.track` by a trained model, scored by `d2retrain track-eval` (HOTA, MOTA,
IDF1, ID switches), beside a naive tracker on the same model's detections at score 0.5: greedy
IoU matching of each frame's boxes to the previous frame's (IoU >= 0.3, best pairs first), a new
id for any box left over. Targets: IDF1 >= 0.8,
MOTA >= 0.7, fewer ID switches than the naive tracker.

Cost: `infer_video` with tracking against without, on the same video (decoding, model, drawing and
encoding included), --repeats times each in alternating order, medians. Target: <= 1.05x. Memory:
the tracker's peak allocations (tracemalloc) linking 100 and 1,000 frames of 6 moving objects.
Target: flat (the frames are not kept).

Usage: python benchmarks/bench_tracking.py [--model results/person_ball/model] [--repeats 3] [--videos 3]
The model is the main job's (README: the first command); a model trained for a few iterations
finds too little for the quality targets to mean anything.
"""

import argparse
import json
import logging
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from alternating import alternating

from d2retrain.core.config import with_defaults
from d2retrain.data.demo import write_demo_dataset
from d2retrain.infer.inputs import InputFile
from d2retrain.infer.pipeline import inference_options, run_inference
from d2retrain.infer.track import VideoTracker, tracker_options
from d2retrain.infer.trackscore import score_tracks
from d2retrain.model.instances import Instances

logger = logging.getLogger("bench_tracking")

__all__ = ["main"]

COLUMNS = ("HOTA", "MOTA", "IDF1", "IDSW", "FP", "FN", "tracks")


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (x0 y0 x1 y1) with every box of ``b``."""
    x0, y0 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x1, y1 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def naive_tracks(jsonl: Path, output: Path, threshold: float = 0.3) -> Path:
    """The baseline: each frame's boxes (the JSONL's, score >= 0.5) matched greedily by IoU to the
    previous frame's; a box left over starts a new track. Written in MOTChallenge result form."""
    rows, previous, previous_ids, next_id = [], np.zeros((0, 4)), [], 1
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        if "instances" not in record:
            continue
        kept = [i for i in record["instances"] if i["score"] >= 0.5]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (i["bbox"] for i in kept)]).reshape(-1, 4)
        ids = [-1] * len(kept)
        if len(previous) and len(kept):
            overlap = _iou(previous, boxes)
            for flat in np.argsort(-overlap, axis=None):
                old, new = divmod(int(flat), overlap.shape[1])
                if overlap[old, new] < threshold:
                    break
                if ids[new] < 0 and previous_ids[old] not in ids:
                    ids[new] = previous_ids[old]
        for number in range(len(kept)):
            if ids[number] < 0:
                ids[number], next_id = next_id, next_id + 1
        for track_id, box, instance in zip(ids, boxes.tolist(), kept, strict=True):
            x0, y0, x1, y1 = box
            rows.append(
                f"{record['frame'] + 1},{track_id},{x0:.2f},{y0:.2f},{x1 - x0:.2f},{y1 - y0:.2f},"
                f"{instance['score']:.4f},-1,-1,-1\n"
            )
        previous, previous_ids = boxes, ids
    output.write_text("".join(rows))
    return output


def _quality(model: Path, root: Path, seed: int) -> dict[str, dict]:
    """Both trackers' scores on the demo video of ``seed`` (the same scene, other colours)."""
    layout = write_demo_dataset(root / f"demo{seed}", seed=seed, train=1, val=1)
    options = inference_options(with_defaults({"inference": {"track": True, "device": "cpu"}})["inference"])
    out = root / f"out{seed}"
    run_inference(model, [], [layout.video], out, options, threads=2)
    bytetrack = score_tracks(layout.video_ground_truth, out / "videos" / "demo.tracks.csv")
    naive = naive_tracks(out / "videos" / "demo.jsonl", root / f"naive{seed}.csv")
    return {
        "ByteTrack": bytetrack,
        "naive IoU": score_tracks(layout.video_ground_truth, naive, bytetrack["frames"]),
    }


def _cost(model: Path, root: Path, repeats: int) -> dict[str, float]:
    layout = write_demo_dataset(root / "cost", train=1, val=1)
    item = InputFile.of(layout.video, "video")

    def side(track: bool):
        options = inference_options(
            with_defaults({"inference": {"track": track, "device": "cpu"}})["inference"]
        )

        def run() -> float:
            start = time.perf_counter()
            run_inference(model, [], [item], root / f"cost_{track}", options, threads=2)
            return time.perf_counter() - start

        return run

    times = alternating({"without tracking": side(False), "with tracking": side(True)}, repeats)
    return {name: statistics.median(values) for name, values in times.items()}


def _tracker_peak(frames: int) -> int:
    """Peak bytes allocated while linking ``frames`` frames of 6 objects moving across 640x360."""
    options = tracker_options(with_defaults({})["inference"]["tracker"])
    tracker = VideoTracker(options, rate=25, score_threshold=0.5, trail_frames=10)
    image = np.zeros((8, 8, 3), np.uint8)  # the tracker reads boxes and scores only
    tracemalloc.start()
    for index in range(frames):  # each object bounces between the sides, in its own lane
        x = np.array([20 + abs((3 * index + 90 * k) % 1000 - 500) for k in range(6)], np.float32)
        y = np.array([10 + 45 * k for k in range(6)], np.float32)
        boxes = np.stack([x, y, x + 40, y + 40], axis=1)
        instances = Instances(
            boxes, np.full(6, 0.9, np.float32), np.zeros(6, np.int64), np.zeros((6, 1, 1), bool)
        )
        for _ in tracker.push(index, image, instances):
            pass
    for _ in tracker.finish():
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> None:
    """Run the comparisons and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("results/person_ball/model"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, alternating")
    parser.add_argument("--videos", type=int, default=3, help="demo videos scored (seeds 0..N-1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not (args.model / "classes.json").is_file():
        parser.error(
            f"{args.model}: no trained model folder; run the main job first (README) or give --model"
        )
    with tempfile.TemporaryDirectory(prefix="bench_tracking-") as scratch:
        root = Path(scratch)
        print(f"{'video':<18}" + "".join(f"{column:>8}" for column in COLUMNS))
        totals: dict[str, list[dict]] = {}
        for seed in range(args.videos):
            for name, values in _quality(args.model, root, seed).items():
                totals.setdefault(name, []).append(values)
                print(f"{f'seed {seed}, {name}':<18}" + "".join(f"{values[column]:>8}" for column in COLUMNS))
        for name, runs in totals.items():
            mean = {column: round(statistics.mean(run[column] for run in runs), 4) for column in COLUMNS}
            print(f"{f'mean, {name}':<18}" + "".join(f"{mean[column]:>8}" for column in COLUMNS))
        times = _cost(args.model, root, args.repeats)
    ratio = times["with tracking"] / times["without tracking"]
    print(
        f"video inference: {times['without tracking']:.2f} s without tracking, "
        f"{times['with tracking']:.2f} s with: {ratio:.3f}x (target <= 1.05)"
    )
    small, large = _tracker_peak(100), _tracker_peak(1000)
    print(
        f"tracker peak memory: {small / 1024:.0f} KiB for 100 frames, "
        f"{large / 1024:.0f} KiB for 1,000 ({large / small:.2f}x)"
    )


if __name__ == "__main__":
    main()
