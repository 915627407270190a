"""What made each file's outputs, kept beside them, so that a rerun infers only what changed.

Each inferred file gets ``.<name>.record.json`` in its output folder (``images/`` or ``videos/``),
written after its outputs: the input's size, modification time and SHA-256, the model (its weights'
or export's SHA-256 and its labels), the options that change that kind of output, the inference
code's hash, and the file's status. A rerun reuses a file's outputs when they are all there and the
record matches; anything else (no record, a killed write, another model, option or content)
infers the file again. Reuse is safe because a file's predictions depend on the file and the model
only (:mod:`d2retrain.model.resize`: batches never mix input sizes).
"""

import dataclasses
import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from d2retrain.core.codehash import code_hash
from d2retrain.core.fileio import file_digest, write_text_atomic
from d2retrain.infer.inputs import InputFile, frame_files, output_files, track_files
from d2retrain.infer.summary import FileStatus
from d2retrain.infer.videoio import sequence_info
from d2retrain.model.exported import is_export, model_classes, read_contract
from d2retrain.model.folder import ModelFolder

logger = logging.getLogger(__name__)

__all__ = [
    "OUTPUT_OPTIONS",
    "MadeFrom",
    "forget",
    "made_from",
    "remove_stale",
    "reusable",
    "write_record",
]

# The options that change each kind of output (batch size, device and shards change none).
OUTPUT_OPTIONS = {
    "image": ("score_threshold", "max_detections"),
    "video": (
        "score_threshold",
        "max_detections",
        "save_frames",
        "max_frames",
        "frame_rate",
        "track",
        "tracker",
        "trail_frames",
    ),
}
_TRACKING_ONLY = ("tracker", "trail_frames")  # options that change nothing when not tracking
_RECORD = ".{name}.record.json"


@dataclasses.dataclass(frozen=True)
class MadeFrom:
    """What a job's outputs are made from, besides each input file.

    Attributes:
        model: A digest of the model (weights or export file, and its labels).
        options: The inference options by name (only :data:`OUTPUT_OPTIONS` of a kind count).
        code: A hash of the inference code.
    """

    model: str
    options: dict[str, Any]
    code: str

    def of(self, kind: str) -> dict[str, Any]:
        """The part of the record that a file of ``kind`` must match, its input aside."""
        options = {name: self.options[name] for name in OUTPUT_OPTIONS[kind]}
        if not options.get("track", True):
            options = {name: value for name, value in options.items() if name not in _TRACKING_ONLY}
        return {"model": self.model, "options": options, "code": self.code}


def made_from(model_dir: str | Path, options: dict[str, Any]) -> MadeFrom:
    """What a run with a model folder or export folder and these options makes its outputs from:
    the served weights' (or the export file's) SHA-256 and the labels, the options, and the hash
    of the inference code (:func:`d2retrain.core.codehash.code_hash` of the pipeline).

    Raises:
        ModelFolderError: Neither a model folder nor an export folder.
    """
    if is_export(model_dir):
        weights = read_contract(model_dir).sha256
    else:
        weights = file_digest(ModelFolder(model_dir).served_weights())
    names, category_ids = model_classes(model_dir)
    model = hashlib.sha256(json.dumps([weights, names, category_ids]).encode()).hexdigest()
    return MadeFrom(model, dict(options), code_hash(Path(__file__).with_name("pipeline.py")))


def _record_path(item: InputFile, inference_dir: Path) -> Path:
    return inference_dir / Path(output_files(item)[0]).parent / _RECORD.format(name=item.name)


def _outputs_complete(
    item: InputFile, inference_dir: Path, status: FileStatus, options: dict[str, Any]
) -> bool:
    if not all((inference_dir / path).is_file() for path in output_files(item)):
        return False
    if item.kind != "video" or status.status == "error":
        return True
    tracks = track_files(item.name) if options.get("track") else ()
    if not all((inference_dir / "videos" / name).is_file() for name in tracks):
        return False
    if options.get("save_frames"):
        frames = inference_dir / "videos" / f"{item.name}_frame_{max(status.frames - 1, 0):04d}.png"
        return frames.is_file()
    return True


def reusable(item: InputFile, inference_dir: str | Path, made_from: MadeFrom) -> FileStatus | None:
    """The status of the file's earlier outputs when they can be kept, else None.

    They can when all of them are there and the record matches the model, the options of the
    file's kind and the code, and the input has the recorded size and modification time, or,
    when those changed (a copy, a ``touch``), the recorded SHA-256.

    Args:
        item: The input file.
        inference_dir: The inference folder (``images/`` and ``videos/`` inside).
        made_from: What the outputs would be made from now.
    """
    folder = Path(inference_dir)
    try:
        record = json.loads(_record_path(item, folder).read_text())
        status = FileStatus(**record["status"])
        stat = _input_stat(item.path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if {key: record.get(key) for key in ("model", "options", "code")} != made_from.of(item.kind):
        return None
    if not _same_content(record.get("input", {}), stat, item.path):
        return None
    if not _outputs_complete(item, folder, status, made_from.options):
        return None
    return dataclasses.replace(status, path=item.path)


def _input_stat(path: str) -> tuple[int, int]:
    """An input's size and modification time; for a folder of frames, the total size of its frames
    and ``seqinfo.ini`` and the latest time of the folder and those files."""
    if not os.path.isdir(path):
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    stats = [os.stat(frame) for frame in _folder_files(path)]
    return sum(s.st_size for s in stats), max([os.stat(path).st_mtime_ns, *(s.st_mtime_ns for s in stats)])


def _folder_files(folder: str) -> list[str]:
    """What a folder of frames is made of: its frames and its ``seqinfo.ini`` (the frame rate)."""
    ini = sequence_info(folder)
    return [*frame_files(folder), *([str(ini)] if ini is not None else [])]


def _input_digest(path: str) -> str:
    """An input's SHA-256; for a folder of frames, that of its frames' (and ``seqinfo.ini``'s)
    names and SHA-256s."""
    if not os.path.isdir(path):
        return file_digest(path)
    frames = [[os.path.basename(frame), file_digest(frame)] for frame in _folder_files(path)]
    return hashlib.sha256(json.dumps(frames).encode()).hexdigest()


def _same_content(source: dict, stat: tuple[int, int], path: str) -> bool:
    """The recorded input has the file's size and time, or its size and SHA-256 (hashed only then)."""
    if (source.get("size"), source.get("mtime_ns")) == stat:
        return True
    return source.get("size") == stat[0] and source.get("sha256") == _input_digest(path)


def forget(item: InputFile, inference_dir: str | Path) -> None:
    """Remove a file's record before it is inferred again: a run killed in between leaves its
    outputs without a record, and they are not reused."""
    _record_path(item, Path(inference_dir)).unlink(missing_ok=True)


def write_record(item: InputFile, inference_dir: str | Path, made_from: MadeFrom, status: FileStatus) -> None:
    """Record what a file's outputs, just written, were made from (written atomically, last)."""
    stat = _input_stat(item.path) if os.path.exists(item.path) else None
    source: dict[str, Any] = {"path": str(item.path), "kind": item.kind, "name": item.name}
    if stat is not None:
        source |= {"size": stat[0], "mtime_ns": stat[1], "sha256": _input_digest(item.path)}
    record = {"input": source, **made_from.of(item.kind), "status": dataclasses.asdict(status)}
    write_text_atomic(_record_path(item, Path(inference_dir)), json.dumps(record, indent=1) + "\n")


def remove_stale(inference_dir: str | Path, current: Iterable[InputFile]) -> int:
    """Remove the outputs and records of files no longer among the inputs (deleted or renamed):
    only outputs that a record names, so nothing this package did not write is touched.

    Args:
        inference_dir: The inference folder.
        current: Every input file of the run.

    Returns:
        How many files' outputs were removed.
    """
    folder = Path(inference_dir)
    wanted = {(item.kind, item.name) for item in current}
    removed = 0
    for kind_folder in ("images", "videos"):
        try:
            names = os.listdir(folder / kind_folder)
        except FileNotFoundError:
            continue
        for name in names:
            if not (name.startswith(".") and name.endswith(".record.json")):
                continue
            try:
                source = json.loads((folder / kind_folder / name).read_text())["input"]
                item = InputFile(source["path"], source["kind"], source["name"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if (item.kind, item.name) in wanted:
                continue
            for path in output_files(item):
                (folder / path).unlink(missing_ok=True)
            if item.kind == "video":
                for frame in (folder / "videos").glob(f"{glob.escape(item.name)}_frame_*.png"):
                    frame.unlink()
                for track_file in track_files(item.name):
                    (folder / "videos" / track_file).unlink(missing_ok=True)
            (folder / kind_folder / name).unlink()
            removed += 1
    if removed:
        logger.info("removed the outputs of %d files no longer among the inputs", removed)
    return removed
