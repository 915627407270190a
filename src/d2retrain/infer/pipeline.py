"""Inference on images and videos: one model load per job, reading, predicting and writing overlapped."""

import collections
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from d2retrain.core.errors import InputFileError
from d2retrain.core.fileio import remove_leftovers, write_bytes_atomic, write_text_atomic
from d2retrain.data.images import read_image
from d2retrain.infer.draw import draw_instances, error_card
from d2retrain.infer.inputs import IMAGE_SUFFIXES, InputFile
from d2retrain.infer.options import DEPTH, InferenceOptions, Labels, batched, inference_options, png_bytes
from d2retrain.infer.reuse import MadeFrom, forget, made_from, reusable, write_record
from d2retrain.infer.summary import FileStatus
from d2retrain.infer.track import require_tracker
from d2retrain.infer.video import infer_video
from d2retrain.infer.videoio import ahead, yield_to_the_model
from d2retrain.model.exported import is_export, load_exported, read_contract
from d2retrain.model.folder import ModelFolder
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
    predictor: Predictor,
    labels: Labels,
    files: Sequence[InputFile],
    folder: str | Path,
    batch_size: int = 1,
    done: Callable[[InputFile, FileStatus], None] | None = None,
    score_threshold: float = 0.0,
) -> list[FileStatus]:
    """Predict each image and write ``<name>.png`` (drawn) and ``<name>.json`` into ``folder``.

    Images are decoded ahead in one thread and drawn and written behind in another, both at the
    lowest priority, so the model never waits for the disk nor for them; up to ``batch_size``
    images go through the model at once (those of one input size together: a file's predictions
    do not depend on the files beside it). A bad file gets a JSON that says what was wrong and a
    picture that says it was not inferred; the others go on. Temporaries of these files left by a
    killed run are removed first. ``done(file, status)`` runs once each file's outputs are written.
    Instances scored below ``score_threshold`` are left out (the model reports lower ones to the
    tracker of videos).

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
        for batch in batched(zip(files, ahead(map(_try_load, files), DEPTH), strict=True), batch_size):
            start = time.perf_counter()
            good = [image for _, image in batch if not isinstance(image, InputFileError)]
            predictions = iter(predictor.predict_batch(good) if good else [])
            for item, image in batch:
                if isinstance(image, InputFileError):
                    write = functools.partial(_write_image_error, item, folder, str(image))
                else:
                    instances = next(predictions)
                    instances = instances.take(instances.scores >= score_threshold)
                    write = functools.partial(_write_image, item, folder, image, instances, labels, start)
                pending.append(writer.submit(_then, write, item, done))
            bar.update(len(batch))
            while len(pending) > DEPTH:
                statuses.append(pending.popleft().result())
        statuses += [future.result() for future in pending]
    return statuses


def _then(
    write: Callable[[], FileStatus], item: InputFile, done: Callable[[InputFile, FileStatus], None] | None
) -> FileStatus:
    status = write()
    if done is not None:
        done(item, status)
    return status


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
    write_bytes_atomic(folder / f"{item.name}.png", png_bytes(draw_instances(image, instances, labels.names)))
    write_text_atomic(folder / f"{item.name}.json", json.dumps(record) + "\n")
    return FileStatus(
        item.path, "image", item.name, instances=len(instances), frames=1, seconds=time.perf_counter() - start
    )


def _write_image_error(item: InputFile, folder: Path, message: str) -> FileStatus:
    logger.warning("not inferred: %s", message)
    record = {"file": Path(item.path).name, "status": "error", "error": message, "instances": []}
    write_bytes_atomic(folder / f"{item.name}.png", png_bytes(error_card(Path(item.path).name, message)))
    write_text_atomic(folder / f"{item.name}.json", json.dumps(record) + "\n")
    return FileStatus(item.path, "image", item.name, status="error", error=message)


def run_inference(
    model_dir: str | Path,
    images: Sequence[str | InputFile],
    videos: Sequence[str | InputFile],
    output_dir: str | Path,
    options: InferenceOptions,
    expected_classes: Sequence[str] | None = None,
    threads: int = 1,
    reuse: bool = False,
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
        threads: CPU threads.
        reuse: Keep the outputs of files whose record says they were made from the same content,
            model, output options and code (:mod:`d2retrain.infer.reuse`); infer only the others.

    Returns:
        One status per file, images first, in order.

    Raises:
        D2RetrainError: No ``classes.json`` or ``contract.json``, other classes, a corrupt
            export, or an engine not installed.
    """
    if options.track and videos:
        require_tracker()  # before any image is inferred
    output = Path(output_dir)
    files = [f if isinstance(f, InputFile) else InputFile.of(f, "image") for f in images]
    files += [f if isinstance(f, InputFile) else InputFile.of(f, "video") for f in videos]
    made = made_from(model_dir, dataclasses.asdict(options)) if reuse else None
    kept = _reusable(files, output, made)
    todo = [item for item in files if (item.kind, item.name) not in kept]
    if not todo and expected_classes is not None:  # the model is not loaded: check its classes here
        _check_classes(model_dir, expected_classes)
    inferred = _infer(model_dir, todo, output, options, expected_classes, threads, made) if todo else {}
    statuses = [kept.get((item.kind, item.name)) or inferred[(item.kind, item.name)] for item in files]
    bad = [s for s in statuses if s.status != "ok"]
    logger.info(
        "%d files (%d frames, %d instances): %d inferred, %d kept from an earlier run; %d with problems%s",
        len(statuses),
        sum(s.frames for s in statuses),
        sum(s.instances for s in statuses),
        len(todo),
        len(kept),
        len(bad),
        "".join(f"\n  {s.status}: {s.error}" for s in bad),
    )
    return statuses


def _check_classes(model_dir: str | Path, expected_classes: Sequence[str]) -> None:
    if is_export(model_dir):
        read_contract(model_dir, expected_classes)
    else:
        ModelFolder(model_dir).read_classes(expected_classes)


def _reusable(
    files: Sequence[InputFile], output: Path, made: MadeFrom | None
) -> dict[tuple[str, str], FileStatus]:
    """The statuses of the files whose earlier outputs can be kept (none without ``made``); the
    others' records are removed, since they are inferred again."""
    kept = {}
    for item in files:
        status = reusable(item, output, made) if made is not None else None
        if status is not None:
            kept[(item.kind, item.name)] = status
        elif made is not None:
            forget(item, output)
    return kept


def _infer(
    model_dir: str | Path,
    files: Sequence[InputFile],
    output: Path,
    options: InferenceOptions,
    expected_classes: Sequence[str] | None,
    threads: int,
    made: MadeFrom | None,
) -> dict[tuple[str, str], FileStatus]:
    """Load the model and infer ``files``; with ``made``, record each file's outputs once written."""
    predictor, labels, engine = _load(model_dir, expected_classes, options, threads)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # set by SLURM for a job given GPUs
    logger.info(
        "%s model from %s on %s%s",
        engine,
        model_dir,
        getattr(predictor, "device", options.device),  # the device used, not "auto"
        f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "",
    )

    def done(item: InputFile, status: FileStatus) -> None:
        if made is not None:
            write_record(item, output, made, status)

    images = [item for item in files if item.kind == "image"]
    statuses = (
        infer_images(
            predictor, labels, images, output / "images", options.batch_size, done, options.score_threshold
        )
        if images
        else []
    )
    for item in files:
        if item.kind == "video":
            statuses.append(infer_video(predictor, labels, item, output / "videos", options))
            done(item, statuses[-1])
    return {(status.kind, status.name): status for status in statuses}


def _load(
    model_dir: str | Path, expected_classes: Sequence[str] | None, options: InferenceOptions, threads: int
) -> tuple[Predictor, Labels, str]:
    """The predictor of a model or export folder, its labels, and what runs it (for the log)."""
    expected = list(expected_classes) if expected_classes is not None else None
    score, most = options.model_score_threshold, options.max_detections
    if is_export(model_dir):
        predictor, contract = load_exported(model_dir, expected, options.device, score, most, threads)
        labels = Labels(tuple(contract.classes), tuple(contract.source_ids))
        return predictor, labels, f"{contract.engine} exported to {contract.format}"
    import torch

    from d2retrain.model.engines import load_predictor

    torch.set_num_threads(max(1, threads))
    model, info = load_predictor(model_dir, expected, options.device, score, most)
    return model, Labels(tuple(info.classes), tuple(info.source_ids)), info.engine
