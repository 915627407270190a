"""Inference throughput: the workflow's per-shard jobs against a plain load-once loop, in one run.

Images: 200 demo images through `infer_shard` shard by shard, as the `infer_NN` jobs run it
(one model load per shard, decoding, drawing, PNG and JSON writing included) against a loop that
loads the model once and predicts the same files. Video: `infer_video` (decode, infer, draw,
encode overlapped) against the bare model on the same frames, decoded beforehand. Where
detectron2 is installed, also detectron2's own demo loop (`DefaultPredictor` + `VideoVisualizer`,
frame by frame, written with cv2.VideoWriter as its demo does) against the workflow on the same
detectron2 model. Targets: images >= 0.9x, video >= 0.9x, and above detectron2's demo loop.

Each side runs --repeats times (3), in alternating order; the medians are printed.

Batching: images at batch size 2 when a batch holds only images of one input size (a file's
predictions are then those it gets alone) against batches of any sizes padded to the largest (as
before), on a folder of mixed sizes and one of equal sizes. Target: >= 0.97x on both.

Usage: python benchmarks/bench_infer.py [--model DIR] [--images 200] [--frames 60] [--shards 4]
       [--batching-only]
Without --model, a small model is trained for two iterations on demo data (its low scores are
taken at threshold 0.01, capped at 8 instances, so every image has objects to draw).
"""

import argparse
import importlib.util
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import torch
from alternating import alternating

from d2retrain.core.config import with_defaults
from d2retrain.data.demo import write_demo_dataset
from d2retrain.data.filtering import FilterOptions
from d2retrain.data.prepare import filter_file
from d2retrain.infer.inputs import InputFile
from d2retrain.infer.pipeline import Labels, infer_images, infer_video, inference_options
from d2retrain.infer.videoio import read_frames
from d2retrain.model.engines import load_predictor, read_model_config
from d2retrain.model.export import export_model
from d2retrain.model.exported import load_exported
from d2retrain.train.run import train_from_config
from d2retrain.workflow.planning import shards
from d2retrain.workflow.shard import infer_shard

logger = logging.getLogger("bench_infer")

__all__ = ["main"]

CLASSES = ["person", "sports ball"]
VIDEO = Path(__file__).resolve().parents[1] / "tests" / "assets" / "video" / "one-by-one-person-detection.mp4"


def _quick_model(root: Path, engine: str, architecture: str, test_size: int) -> Path:
    layout = write_demo_dataset(root / "demo", train=8, val=4, video_frames=2)
    files = {}
    for split in ("train", "val"):
        files[split] = str(root / f"{split}.json")
        filter_file(str(layout.annotations(split)), files[split], CLASSES, FilterOptions())
    output = root / f"model_{engine}_{Path(architecture).stem}"
    train_from_config(
        model={
            "engine": engine,
            "architecture": architecture,
            "min_size_test": test_size,
            "max_size_test": 2 * test_size,
        },
        train={
            "iterations": 1,
            "images_per_batch": 2,
            "base_lr": 1e-5,
            "warmup_iterations": 0,
            "steps": [],
            "eval_period": 0,
            "device": "cpu",
        },
        classes=CLASSES,
        train_json=files["train"],
        train_images=str(layout.images("train")),
        val_json=files["val"],
        val_images=str(layout.images("val")),
        source_json=str(layout.annotations("train")),
        output_dir=str(output),
        threads=torch.get_num_threads(),
    )
    return output


def bench_images(model: Path, folder: Path, count: int, shard_count: int, options, repeats: int) -> float:
    """Prints images/s of a plain loop and of the workflow's shard jobs; returns the median ratio."""
    layout = write_demo_dataset(folder / "images", train=1, val=count, video_frames=2)
    paths = sorted(layout.images("val").glob("*.jpg"))
    for path in paths:
        path.read_bytes()  # warm the page cache for both sides
    files = [InputFile.of(path, "image") for path in paths]
    load_predictor(model, device=options.device)  # imports paid before timing, for both sides

    def plain() -> float:
        start = time.perf_counter()
        predictor, _ = load_predictor(
            model, device=options.device, score_threshold=options.score_threshold, max_detections=8
        )
        for path in paths:
            predictor(cv2.imread(str(path)))
        return count / (time.perf_counter() - start)

    def workflow() -> float:
        start = time.perf_counter()
        for shard, group in shards(files, shard_count).items():
            status = str(folder / "out" / "status" / f"shard_{shard:02d}.json")
            images = [item.path for item in group]
            infer_shard(str(model), images, [], status, options, CLASSES, torch.get_num_threads())
        return count / (time.perf_counter() - start)

    return _report(
        f"images ({count}, {shard_count} shards, one model load each)",
        ("plain load-once loop (read + predict)", plain),
        ("workflow jobs (read, predict, draw, PNG + JSON)", workflow),
        "img/s",
        ">= 0.9",
        repeats,
    )


class _MixedBatches:
    """The predictor as it batched before batches held one input size: every image of a batch in
    one forward pass, padded to the largest (the baseline of :func:`bench_batching`)."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor

    def predict_batch(self, images):
        return self.predictor._forward(images)


def bench_batching(model: Path, folder: Path, count: int, options, repeats: int) -> list[float]:
    """Prints images/s at batch size 2 of batches that hold one input size against batches of any
    sizes (before), on a folder of mixed sizes and on one of equal sizes; returns both ratios."""
    mixed = write_demo_dataset(folder / "batching", train=1, val=count, video_frames=2).images("val")
    equal = folder / "batching_equal"
    equal.mkdir()
    for path in sorted(mixed.glob("*.jpg")):
        cv2.imwrite(str(equal / path.name), cv2.resize(cv2.imread(str(path)), (256, 192)))
    predictor, labels = _load(model, options)
    ratios = []
    for name, images in (("mixed sizes", mixed), ("equal sizes", equal)):
        files = [InputFile.of(path, "image") for path in sorted(images.glob("*.jpg"))]

        def rate(chosen, files: list[InputFile] = files) -> float:
            start = time.perf_counter()
            infer_images(chosen, labels, files, folder / "out_batching", batch_size=2)
            return len(files) / (time.perf_counter() - start)

        ratios.append(
            _report(
                f"images at batch size 2 ({len(files)} demo images, {name})",
                (
                    "batches of any sizes (before: padding leaks between files)",
                    lambda: rate(_MixedBatches(predictor)),
                ),
                ("batches of one input size (each file as alone)", lambda: rate(predictor)),
                "img/s",
                ">= 0.97",
                repeats,
            )
        )
    return ratios


def _report(
    title: str,
    baseline: tuple[str, Callable[[], float]],
    workflow: tuple[str, Callable[[], float]],
    unit: str,
    target: str,
    repeats: int,
) -> float:
    """Time a baseline and the workflow in turn, ``repeats`` times (the order alternating, so
    that drifts of the machine fall on both), print their median rates and the median of the
    ratios of each pair, and return that ratio."""
    rates = alternating(dict([baseline, workflow]), repeats)
    ratios = [ours / theirs for theirs, ours in zip(rates[baseline[0]], rates[workflow[0]], strict=True)]
    print(f"{title}, median of {repeats}:")
    for label, values in rates.items():
        print(f"  {label:<58} {statistics.median(values):7.2f} {unit}")
    ratio = statistics.median(ratios)
    spread = f" (runs {min(ratios):.3f}..{max(ratios):.3f})" if repeats > 1 else ""
    print(f"  ratio {ratio:.3f}{spread} (target {target})")
    return ratio


def _load(model: Path, options) -> tuple:
    predictor, info = load_predictor(
        model, device=options.device, score_threshold=options.score_threshold, max_detections=8
    )
    return predictor, Labels(tuple(info.classes), tuple(info.source_ids))


def _workflow_video(predictor, labels: Labels, folder: Path, options) -> float:
    """Frames/s of the workflow's video pipeline on the real video."""
    start = time.perf_counter()
    status = infer_video(predictor, labels, InputFile.of(VIDEO, "video"), folder, options)
    return status.frames / (time.perf_counter() - start)


def bench_video(model: Path, folder: Path, frames: int, options, repeats: int) -> float:
    """Prints frames/s of the bare model on decoded frames and of the workflow; returns the ratio."""
    decoded = list(read_frames(VIDEO, frames))
    predictor, labels = _load(model, options)
    predictor(decoded[0])  # warm-up

    def bare() -> float:
        start = time.perf_counter()
        for frame in decoded:
            predictor(frame)
        return len(decoded) / (time.perf_counter() - start)

    return _report(
        f"video ({len(decoded)} frames of {VIDEO.name})",
        ("bare model on decoded frames", bare),
        (
            "workflow (decode, predict, draw, encode, JSONL)",
            lambda: _workflow_video(predictor, labels, folder, options),
        ),
        "frames/s",
        ">= 0.9",
        repeats,
    )


def bench_detectron2_demo(model: Path, folder: Path, frames: int, options, repeats: int) -> float:
    """Prints frames/s of detectron2's demo loop and of the workflow on the same model."""
    from detectron2.data import MetadataCatalog
    from detectron2.utils.video_visualizer import VideoVisualizer
    from detectron2.utils.visualizer import ColorMode

    predictor, labels = _load(model, options)
    metadata = MetadataCatalog.get("bench_infer_demo").set(thing_classes=list(labels.names))
    default_predictor = predictor._predictor

    def demo() -> float:  # detectron2 demo/predictor.py: run_on_video
        visualizer = VideoVisualizer(metadata, ColorMode.IMAGE)
        writer = None
        start = time.perf_counter()
        count = 0
        for frame in read_frames(VIDEO, frames):
            outputs = default_predictor(frame)["instances"].to("cpu")
            drawn = visualizer.draw_instance_predictions(frame[:, :, ::-1], outputs).get_image()[:, :, ::-1]
            if writer is None:
                fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                writer = cv2.VideoWriter(str(folder / "d2demo.mp4"), fourcc, 10.0, drawn.shape[1::-1], True)
            writer.write(drawn)
            count += 1
        writer.release()
        return count / (time.perf_counter() - start)

    return _report(
        f"detectron2 model, video ({frames} frames)",
        ("detectron2 demo loop (DefaultPredictor + VideoVisualizer)", demo),
        (
            "workflow on the same model",
            lambda: _workflow_video(predictor, labels, folder / "videos_d2", options),
        ),
        "frames/s",
        "> 1",
        repeats,
    )


def bench_exported(model: Path, folder: Path, frames: int, repeats: int, export_format: str) -> float:
    """Prints frames/s of the PyTorch model and of its export on the same decoded video frames,
    both keeping what the export's graph keeps (score >= 0.05, at most 100 instances, masks pasted
    for each): the same work on both sides. Returns the ratio."""
    target = folder / f"export_{model.name}_{export_format}"
    export_model(model, export_format, target, threads=torch.get_num_threads())
    decoded = list(read_frames(VIDEO, frames))
    pytorch, _ = load_predictor(model, device="cpu", score_threshold=0.05, max_detections=100)
    exported, _ = load_exported(target, device="cpu", threads=torch.get_num_threads())
    for predictor in (pytorch, exported):
        predictor(decoded[0])  # warm-up (onnxruntime plans its kernels on the first run)

    def rate(predictor) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            for frame in decoded:
                predictor(frame)
            return len(decoded) / (time.perf_counter() - start)

        return run

    spec = read_model_config(model)[0]
    return _report(
        f"{spec.architecture}, video ({len(decoded)} frames of {VIDEO.name})",
        ("PyTorch model (eager)", rate(pytorch)),
        (
            f"{export_format} export ({'onnxruntime' if export_format == 'onnx' else 'torch.jit'})",
            rate(exported),
        ),
        "frames/s",
        "side by side",
        repeats,
    )


def main() -> None:
    """Run the benchmarks and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: a quick demo model)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batching-only", action="store_true", help="only the batch composition comparison")
    parser.add_argument("--threshold", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, alternating")
    parser.add_argument("--d2-test-size", type=int, default=320, help="detectron2 model's test size")
    parser.add_argument("--export-test-size", type=int, default=480, help="the R50-FPN export's test size")
    parser.add_argument("--export-frames", type=int, default=20, help="frames of the export comparison")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(torch.get_num_threads())
    given = {
        "score_threshold": args.threshold,
        "max_detections": 8,
        "device": "cpu",
        "max_frames": args.frames,
    }
    options = inference_options(with_defaults({"inference": given})["inference"])
    print(f"CPU threads: {torch.get_num_threads()}; cuda: {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        model = args.model or _quick_model(root, "torchvision", "maskrcnn_resnet18_fpn", 192)
        bench_batching(model, root, args.images, options, args.repeats)
        if args.batching_only:
            return
        bench_images(model, root, args.images, args.shards, options, args.repeats)
        bench_video(model, root, args.frames, options, args.repeats)
        large = _quick_model(root, "torchvision", "maskrcnn_resnet50_fpn", args.export_test_size)
        for candidate in (model, large):
            for export_format in ("onnx", "torchscript"):
                bench_exported(candidate, root, args.export_frames, args.repeats, export_format)
        if importlib.util.find_spec("detectron2") is not None:
            zoo = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
            d2_model = _quick_model(root, "detectron2", zoo, args.d2_test_size)
            bench_detectron2_demo(d2_model, root, min(args.frames, 30), options, args.repeats)
        else:
            print("detectron2 is not installed: its demo loop is not compared")


if __name__ == "__main__":
    main()
