"""Inference on a video: frames decoded ahead, predicted in batches, drawn and encoded behind."""

import collections
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
from d2retrain.infer.draw import draw_instances, error_card
from d2retrain.infer.inputs import VIDEO_SUFFIXES, InputFile
from d2retrain.infer.options import DEPTH, InferenceOptions, Labels, batched, png_bytes
from d2retrain.infer.summary import FileStatus
from d2retrain.infer.videoio import VideoInfo, VideoWriter, ahead, probe, read_frames, yield_to_the_model
from d2retrain.model.instances import Instances, Predictor

logger = logging.getLogger(__name__)

__all__ = ["infer_video"]


def infer_video(
    predictor: Predictor, labels: Labels, item: InputFile, folder: str | Path, options: InferenceOptions
) -> FileStatus:
    """Predict every frame of a video; write ``<name>.mp4`` (drawn, H.264 yuv420p, same rate and
    frame count) and ``<name>.jsonl`` (a line per frame), and the frames as PNG when asked.

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
    outputs = {f"{item.name}.mp4", f"{item.name}.jsonl"}
    frame = re.compile(rf"{re.escape(item.name)}_frame_\d+\.png")
    remove_leftovers(folder, lambda name: name in outputs or frame.fullmatch(name) is not None)
    start = time.perf_counter()
    path = Path(item.path)
    try:
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise InputFileError(
                f"{path}: unsupported file type {path.suffix!r} (videos: {' '.join(VIDEO_SUFFIXES)})"
            )
        info = probe(path)
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
    with atomic_open(folder / f"{item.name}.jsonl") as lines, mp4:
        prefix = folder / item.name if options.save_frames else None
        writer = _FrameWriter(mp4, lines, labels, info.rate, prefix)
        try:
            frames = read_frames(item.path, options.max_frames)
            _predict_frames(predictor, frames, writer, status, expected, options.batch_size)
        except InputFileError as error:
            status.status, status.error = "truncated", str(error)
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


class _FrameWriter:
    """Draws, encodes and logs frames in order, in one background thread."""

    def __init__(
        self, video: VideoWriter, lines, labels: Labels, rate: Fraction, frames_prefix: Path | None
    ) -> None:
        self.video, self.lines, self.labels, self.rate, self.prefix = (
            video,
            lines,
            labels,
            rate,
            frames_prefix,
        )

    def __call__(self, index: int, frame: np.ndarray, instances: Instances) -> None:
        drawn = draw_instances(frame, instances, self.labels.names)
        self.video.write(drawn)
        record = {
            "frame": index,
            "time": round(float(index / self.rate), 4),
            "instances": self.labels.records(instances),
        }
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
                    status.instances += len(instances)
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
