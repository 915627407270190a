"""Inference on images and videos: one model load per job, reading, predicting and writing overlapped."""

import collections
import dataclasses
import glob
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
from tqdm import tqdm

from d2retrain.core.config import section_defaults
from d2retrain.core.errors import D2RetrainError, InputFileError
from d2retrain.core.fileio import atomic_open, remove_leftovers, write_bytes_atomic, write_text_atomic
from d2retrain.data.images import read_image
from d2retrain.infer.draw import draw_instances, error_card
from d2retrain.infer.inputs import IMAGE_SUFFIXES, VIDEO_SUFFIXES, InputFile, first_missing_output
from d2retrain.infer.summary import FileStatus
from d2retrain.infer.videoio import VideoInfo, VideoWriter, ahead, probe, read_frames, yield_to_the_model
from d2retrain.model.evaluation import to_coco_results
from d2retrain.model.exported import is_export, load_exported
from d2retrain.model.instances import Instances, Predictor

logger = logging.getLogger(__name__)

__all__ = [
    "InferenceOptions",
    "inference_options",
    "Labels",
    "load_image",
    "infer_images",
    "infer_video",
    "run_inference",
]

_DEPTH = 4  # items read ahead of, and written behind, the model
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How to infer; defaults live in the config schema's ``inference`` section.

    Attributes:
        score_threshold: Lowest score kept.
        max_detections: Most instances per image or frame.
        device: ``auto``, ``cpu`` or ``cuda``.
        save_frames: Also write each drawn video frame as ``<name>_frame_%04d.png``.
        max_frames: Infer at most this many frames of each video (0: all).
        batch_size: Images or frames per forward pass.
    """

    score_threshold: float
    max_detections: int
    device: str
    save_frames: bool
    max_frames: int
    batch_size: int


def inference_options(inference: dict[str, Any]) -> InferenceOptions:
    """:class:`InferenceOptions` from the config's ``inference`` section (schema defaults filled in)."""
    values = section_defaults("inference") | inference
    return InferenceOptions(
        **{field.name: values[field.name] for field in dataclasses.fields(InferenceOptions)}
    )


@dataclasses.dataclass(frozen=True)
class Labels:
    """The model's classes as outputs name them: names in model order, original dataset ids."""

    names: tuple[str, ...]
    category_ids: tuple[int, ...]

    def records(self, instances: Instances) -> list[dict]:
        """Instances in COCO results format (RLE masks, xywh boxes) with category names."""
        records = to_coco_results(None, instances, self.category_ids)
        for record, label in zip(records, instances.classes, strict=True):
            record["category_name"] = self.names[int(label)]
        return records


def load_image(path: str | Path) -> np.ndarray:
    """Read an inference input as BGR uint8, upright (:func:`d2retrain.data.images.read_image`).

    Raises:
        InputFileError: Empty, unsupported, truncated or not an image.
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputFileError(
            f"{path}: unsupported file type {path.suffix!r} (images: {' '.join(IMAGE_SUFFIXES)})"
        )
    return read_image(path)


def _try_load(item: InputFile) -> np.ndarray | InputFileError:
    try:
        return load_image(item.path)
    except InputFileError as error:
        return error


def infer_images(
    predictor: Predictor, labels: Labels, files: Sequence[InputFile], folder: str | Path, batch_size: int = 1
) -> list[FileStatus]:
    """Predict each image and write ``<name>.png`` (drawn) and ``<name>.json`` into ``folder``.

    Images are decoded ahead in one thread and drawn and written behind in another, both at the
    lowest priority, so the model never waits for the disk nor for them; ``batch_size`` images
    go through the model at once. A bad file gets a JSON that says what was wrong and a picture
    that says it was not inferred; the others go on. Temporaries of these files left by a killed
    run are removed first.

    Returns:
        One status per file, in order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    outputs = {f"{item.name}{suffix}" for item in files for suffix in (".png", ".json")}
    remove_leftovers(folder, outputs.__contains__)
    statuses: list[FileStatus] = []
    pending: collections.deque[Future] = collections.deque()
    bar = tqdm(total=len(files), desc="images", unit="img", disable=None)
    with bar, ThreadPoolExecutor(1, "write", yield_to_the_model) as writer:
        for batch in _batched(zip(files, ahead(map(_try_load, files), _DEPTH), strict=True), batch_size):
            start = time.perf_counter()
            good = [image for _, image in batch if not isinstance(image, InputFileError)]
            predictions = iter(predictor.predict_batch(good) if good else [])
            for item, image in batch:
                if isinstance(image, InputFileError):
                    pending.append(writer.submit(_write_image_error, item, folder, str(image)))
                else:
                    instances = next(predictions)
                    pending.append(writer.submit(_write_image, item, folder, image, instances, labels, start))
            bar.update(len(batch))
            while len(pending) > _DEPTH:
                statuses.append(pending.popleft().result())
        statuses += [future.result() for future in pending]
    return statuses


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size`` consecutive items; when ``items`` fails with an :class:`InputFileError`,
    the items before the failure come out first."""
    batch: list[T] = []
    try:
        for item in items:
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
    except InputFileError:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def _write_image(
    item: InputFile, folder: Path, image: np.ndarray, instances: Instances, labels: Labels, start: float
) -> FileStatus:
    record = {
        "file": Path(item.path).name,
        "status": "ok",
        "width": image.shape[1],
        "height": image.shape[0],
        "instances": labels.records(instances),
    }
    write_bytes_atomic(folder / f"{item.name}.png", _png(draw_instances(image, instances, labels.names)))
    write_text_atomic(folder / f"{item.name}.json", json.dumps(record) + "\n")
    return FileStatus(
        item.path, "image", item.name, instances=len(instances), frames=1, seconds=time.perf_counter() - start
    )


def _write_image_error(item: InputFile, folder: Path, message: str) -> FileStatus:
    logger.warning("not inferred: %s", message)
    record = {"file": Path(item.path).name, "status": "error", "error": message, "instances": []}
    write_bytes_atomic(folder / f"{item.name}.png", _png(error_card(Path(item.path).name, message)))
    write_text_atomic(folder / f"{item.name}.json", json.dumps(record) + "\n")
    return FileStatus(item.path, "image", item.name, status="error", error=message)


def _png(image: np.ndarray) -> bytes:
    # fast zlib settings: about 1.7 ms for 256x192, files within 5% of the default's
    flags = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
    ok, encoded = cv2.imencode(".png", image, flags)
    assert ok, "PNG encoding of a uint8 BGR image cannot fail"
    return encoded.tobytes()


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
            write_bytes_atomic(f"{self.prefix}_frame_{index:04d}.png", _png(drawn))


def _predict_frames(
    predictor: Predictor, frames, writer: _FrameWriter, status: FileStatus, expected: int, batch_size: int
) -> None:
    pending: collections.deque[Future] = collections.deque()
    bar = tqdm(total=expected or None, desc="frames", unit="frame", disable=None)
    with bar, ThreadPoolExecutor(1, "encode", yield_to_the_model) as encoder:
        try:
            for batch in _batched(ahead(frames, 2 * _DEPTH), batch_size):
                for frame, instances in zip(batch, predictor.predict_batch(batch), strict=True):
                    pending.append(encoder.submit(writer, status.frames, frame, instances))
                    status.frames += 1
                    status.instances += len(instances)
                bar.update(len(batch))
                while len(pending) > _DEPTH:
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


def run_inference(
    model_dir: str | Path,
    images: Sequence[str | InputFile],
    videos: Sequence[str | InputFile],
    output_dir: str | Path,
    options: InferenceOptions,
    expected_classes: Sequence[str] | None = None,
    status_path: str | Path | None = None,
    threads: int = 1,
) -> list[FileStatus]:
    """Load a model folder once and infer every image and video into ``output_dir``.

    Args:
        model_dir: A trained model folder (``classes.json`` names the classes), or an export
            folder (``contract.json``: ONNX runs through onnxruntime, and torch is not imported).
        images: Image files (``images/<name>.png`` and ``.json``).
        videos: Video files (``videos/<name>.mp4`` and ``.jsonl``).
        output_dir: The inference folder.
        options: Threshold, detections, device, frames.
        expected_classes: Refuse a model trained for other classes.
        status_path: Where to write the files' statuses as JSON (for the run summary).
        threads: CPU threads.

    Returns:
        One status per file.

    Raises:
        D2RetrainError: No ``classes.json`` or ``contract.json``, other classes, a corrupt
            export, or an engine not installed.
    """
    predictor, labels, engine = _load(model_dir, expected_classes, options, threads)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # set by SLURM for a job given GPUs
    logger.info(
        "%s model from %s on %s%s",
        engine,
        model_dir,
        options.device,
        f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "",
    )
    output = Path(output_dir)
    image_files = [f if isinstance(f, InputFile) else InputFile.of(f, "image") for f in images]
    statuses = (
        infer_images(predictor, labels, image_files, output / "images", options.batch_size)
        if image_files
        else []
    )
    video_files = [f if isinstance(f, InputFile) else InputFile.of(f, "video") for f in videos]
    for item in video_files:
        statuses.append(infer_video(predictor, labels, item, output / "videos", options))
    bad = [s for s in statuses if s.status != "ok"]
    logger.info(
        "inferred %d files (%d frames, %d instances); %d with problems%s",
        len(statuses),
        sum(s.frames for s in statuses),
        sum(s.instances for s in statuses),
        len(bad),
        "".join(f"\n  {s.status}: {s.error}" for s in bad),
    )
    if status_path is not None:
        # The status file is the job's declared output: written last, and only when every file's
        # outputs are there (the workflow does not declare them one by one).
        missing = first_missing_output([*image_files, *video_files], output)
        if missing is not None:
            raise D2RetrainError(f"inference wrote no {output / missing}; the shard is not complete")
        write_text_atomic(status_path, json.dumps([dataclasses.asdict(s) for s in statuses], indent=1) + "\n")
    return statuses


def _load(
    model_dir: str | Path, expected_classes: Sequence[str] | None, options: InferenceOptions, threads: int
) -> tuple[Predictor, Labels, str]:
    """The predictor of a model or export folder, its labels, and what runs it (for the log)."""
    expected = list(expected_classes) if expected_classes is not None else None
    score, most = options.score_threshold, options.max_detections
    if is_export(model_dir):
        predictor, contract = load_exported(model_dir, expected, options.device, score, most, threads)
        labels = Labels(tuple(contract.classes), tuple(contract.source_ids))
        return predictor, labels, f"{contract.engine} exported to {contract.format}"
    import torch

    from d2retrain.model.engines import load_predictor

    torch.set_num_threads(max(1, threads))
    model, info = load_predictor(model_dir, expected, options.device, score, most)
    return model, Labels(tuple(info.classes), tuple(info.source_ids)), info.engine
