"""Inference on a video: frames decoded ahead, predicted in batches, linked into tracks (when asked),
drawn and encoded behind."""

import collections
import contextlib
import dataclasses
import glob
import json
import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from d2retrain.core.errors import InputFileError
from d2retrain.core.fileio import atomic_open, remove_leftovers, write_bytes_atomic, write_text_atomic
from d2retrain.infer.draw import PALETTE, draw_instances, error_card
from d2retrain.infer.inputs import VIDEO_SUFFIXES, InputFile, track_files
from d2retrain.infer.options import DEPTH, InferenceOptions, Labels, batched, png_bytes
from d2retrain.infer.summary import FileStatus
from d2retrain.infer.track import TrackedFrame, VideoTracker, track_color
from d2retrain.infer.videoio import VideoInfo, VideoWriter, ahead, probe, read_frames, yield_to_the_model
from d2retrain.model.instances import Instances, Predictor

logger = logging.getLogger(__name__)

__all__ = ["infer_video"]


def infer_video(
    predictor: Predictor, labels: Labels, item: InputFile, folder: str | Path, options: InferenceOptions
) -> FileStatus:
    """Predict every frame of a video (a video file, or a folder of frames); write ``<name>.mp4``
    (drawn, H.264 yuv420p, same rate and frame count) and ``<name>.jsonl`` (a line per frame), and
    the frames as PNG when asked. With ``options.track``, the instances are linked into tracks
    (:class:`d2retrain.infer.track.VideoTracker`): each gets a ``track_id``, each track is drawn in
    its colour, and ``<name>.tracks.csv`` (MOTChallenge result form) and ``<name>.tracks.json``
    (the tracks) are written too.

    Decoding runs a few frames ahead in one thread, drawing and encoding behind in another.
    A video that cannot be opened gets a one-line JSONL with the error and an MP4 that says
    so; one that breaks off keeps the frames before the break, and its JSONL ends with a
    status line (``{"status": "truncated", ...}``). Frames saved and temporaries left by an
    earlier run are removed first.

    Returns:
        The file's status.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{glob.escape(item.name)}_frame_*.png"):
        stale.unlink()
    for previous in track_files(item.name):  # another run's tracks: not this run's, whatever happens
        (folder / previous).unlink(missing_ok=True)
    outputs = {f"{item.name}.mp4", f"{item.name}.jsonl", *track_files(item.name)}
    frame = re.compile(rf"{re.escape(item.name)}_frame_\d+\.png")
    remove_leftovers(folder, lambda name: name in outputs or frame.fullmatch(name) is not None)
    start = time.perf_counter()
    path = Path(item.path)
    try:
        if not path.is_dir() and path.suffix.lower() not in VIDEO_SUFFIXES:
            raise InputFileError(
                f"{path}: unsupported file type {path.suffix!r} (videos: {' '.join(VIDEO_SUFFIXES)})"
            )
        info = probe(path, options.frame_rate)
    except InputFileError as error:
        return _write_video_error(item, folder, str(error))
    expected = min(filter(None, (info.frames, options.max_frames)), default=0)
    status = FileStatus(item.path, "video", item.name)
    try:
        _encode_video(predictor, labels, item, folder, options, info, status, expected)
    except InputFileError as error:  # nothing decodable: the partial outputs were dropped
        return _write_video_error(item, folder, str(error))
    status.seconds = time.perf_counter() - start
    return status


def _encode_video(
    predictor: Predictor,
    labels: Labels,
    item: InputFile,
    folder: Path,
    options: InferenceOptions,
    info: VideoInfo,
    status: FileStatus,
    expected: int,
) -> None:
    mp4 = VideoWriter(folder / f"{item.name}.mp4", info.rate, info.width, info.height)
    tracker = (
        VideoTracker(options.tracker, info.rate, options.score_threshold, options.trail_frames)
        if options.track
        else None
    )
    tracks_csv, tracks_json = (folder / name for name in track_files(item.name))
    mot = atomic_open(tracks_csv) if tracker is not None else contextlib.nullcontext()
    with atomic_open(folder / f"{item.name}.jsonl") as lines, mp4, mot as mot_lines:
        prefix = folder / item.name if options.save_frames else None
        writer = _FrameWriter(mp4, lines, labels, info.rate, prefix, status, tracker, mot_lines)
        try:
            frames = read_frames(item.path, options.max_frames)
            _predict_frames(predictor, frames, writer, status, expected, options.batch_size)
        except InputFileError as error:
            status.status, status.error = "truncated", str(error)
        writer.finish()
        if status.frames == 0:
            raise InputFileError(f"{item.path}: no frame could be decoded ({status.error or 'empty stream'})")
        if expected and status.frames < expected and status.status == "ok":
            status.status = "truncated"
            status.error = (
                f"{item.path}: decoded {status.frames} of the {expected} frames the container lists"
            )
        if status.status != "ok":
            logger.warning("video %s: %s", status.status, status.error)
            record = {"status": status.status, "error": status.error, "frames": status.frames}
            lines.write(json.dumps(record).encode() + b"\n")
    if tracker is not None:
        tracks = tracker.tracks(labels.names)
        counts = collections.Counter(track["class"] for track in tracks)
        status.tracks = ", ".join(f"{name} {counts[name]}" for name in labels.names if counts[name])
        document = {
            "video": Path(item.path).name,
            "frames": status.frames,
            "rate": float(info.rate),
            "tracker": dataclasses.asdict(options.tracker) | {"algorithm": "bytetrack"},
            "tracks_per_class": {name: counts[name] for name in labels.names},
            "tracks": tracks,
        }
        write_text_atomic(tracks_json, json.dumps(document, indent=1) + "\n")


class _FrameWriter:
    """Links (when tracking), draws, encodes and logs frames in order, in one background thread."""

    def __init__(
        self,
        video: VideoWriter,
        lines,
        labels: Labels,
        rate: Fraction,
        frames_prefix: Path | None,
        status: FileStatus,
        tracker: VideoTracker | None = None,
        mot_lines=None,
    ) -> None:
        self.video, self.lines, self.labels, self.rate, self.prefix = (
            video,
            lines,
            labels,
            rate,
            frames_prefix,
        )
        self.status, self.tracker, self.mot_lines = status, tracker, mot_lines

    def __call__(self, index: int, frame: np.ndarray, instances: Instances) -> None:
        if self.tracker is None:
            self._write(index, instances, draw_instances(frame, instances, self.labels.names), None)
            return
        for tracked in self.tracker.push(index, frame, instances):
            self._write_tracked(tracked)

    def finish(self) -> None:
        """Write the frames the tracker still holds (the last one)."""
        if self.tracker is not None:
            for tracked in self.tracker.finish():
                self._write_tracked(tracked)

    def _write_tracked(self, tracked: TrackedFrame) -> None:
        instances, names = tracked.instances, self.labels.names
        colors, labels, rows = [], [], []
        for track_id, track_class, label, score, box in zip(
            tracked.track_ids.tolist(),
            tracked.track_classes.tolist(),
            instances.classes.tolist(),
            instances.scores.tolist(),
            instances.boxes.tolist(),
            strict=True,
        ):
            if track_id < 0:
                colors.append(PALETTE[int(label) % len(PALETTE)])
                labels.append(f"{names[int(label)]} {score:.0%}")
                continue
            colors.append(track_color(track_id))
            labels.append(f"#{track_id} {names[int(track_class)]}")
            x0, y0, x1, y1 = box
            frame = tracked.index + 1  # MOTChallenge counts frames from 1
            rows.append(
                f"{frame},{track_id},{x0:.2f},{y0:.2f},{x1 - x0:.2f},{y1 - y0:.2f},{score:.4f},-1,-1,-1\n"
            )
        trails = [(track_color(track_id), points) for track_id, points in tracked.trails.items()]
        drawn = draw_instances(tracked.image, instances, names, colors=colors, labels=labels, trails=trails)
        self._write(tracked.index, instances, drawn, tracked.track_ids.tolist())
        self.mot_lines.write("".join(rows).encode())

    def _write(
        self, index: int, instances: Instances, drawn: np.ndarray, track_ids: list[int] | None
    ) -> None:
        self.video.write(drawn)
        self.status.instances += len(instances)  # those written (the tracker drops some)
        records = self.labels.records(instances)
        for record, track_id in zip(records, track_ids or [], strict=track_ids is not None):
            record["track_id"] = track_id if track_id >= 0 else None
        record = {"frame": index, "time": round(float(index / self.rate), 4), "instances": records}
        self.lines.write(json.dumps(record).encode() + b"\n")
        if self.prefix is not None:
            write_bytes_atomic(f"{self.prefix}_frame_{index:04d}.png", png_bytes(drawn))


def _predict_frames(
    predictor: Predictor, frames, writer: _FrameWriter, status: FileStatus, expected: int, batch_size: int
) -> None:
    pending: collections.deque[Future] = collections.deque()
    bar = tqdm(total=expected or None, desc="frames", unit="frame", disable=None)
    with bar, ThreadPoolExecutor(1, "encode", yield_to_the_model) as encoder:
        try:
            for batch in batched(ahead(frames, 2 * DEPTH), batch_size):
                for frame, instances in zip(batch, predictor.predict_batch(batch), strict=True):
                    pending.append(encoder.submit(writer, status.frames, frame, instances))
                    status.frames += 1
                bar.update(len(batch))
                while len(pending) > DEPTH:
                    pending.popleft().result()
        finally:
            for future in pending:
                future.result()


def _write_video_error(item: InputFile, folder: Path, message: str) -> FileStatus:
    logger.warning("not inferred: %s", message)
    record = {"status": "error", "error": message, "frames": 0}
    write_text_atomic(folder / f"{item.name}.jsonl", json.dumps(record) + "\n")
    with VideoWriter(folder / f"{item.name}.mp4", Fraction(1), 640, 360) as video:
        video.write(error_card(Path(item.path).name, message))
    return FileStatus(item.path, "video", item.name, status="error", error=message)
