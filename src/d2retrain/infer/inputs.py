"""Inference inputs: folders and globs resolved to files, and the names of their outputs."""

import dataclasses
import glob
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from d2retrain.core.errors import D2RetrainError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "InputFile",
    "check_unique_names",
    "discover",
    "frame_files",
    "output_files",
    "track_files",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
_SUFFIXES = {"image": IMAGE_SUFFIXES, "video": VIDEO_SUFFIXES}


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One file to infer.

    Attributes:
        path: The file as given or found.
        kind: ``image`` or ``video``.
        name: Its outputs' base name (the file name without its suffix).
    """

    path: str
    kind: str
    name: str

    @classmethod
    def of(cls, path: str | os.PathLike[str], kind: str) -> "InputFile":
        """The input for ``path``, named after its stem."""
        path = os.fspath(path)
        return cls(path, kind, os.path.splitext(os.path.basename(path))[0])


def discover(specs: Sequence[str], kind: str) -> list[InputFile]:
    """Resolve folders, globs and file names to the files to infer, each once, in order.

    A folder gives its files with a known ``kind`` suffix (not recursive); for videos, a folder
    that holds no video but image files is one video of those frames (named after the folder, or
    after the MOTChallenge sequence whose ``seqinfo.ini`` is beside it). A
    glob or a file name gives every match, whatever its type (an unsupported one is reported when
    inferred).

    Args:
        specs: Folders, globs or files.
        kind: ``image`` or ``video``.

    Returns:
        The inputs, sorted within each spec.

    Raises:
        D2RetrainError: A folder or file does not exist, or two inputs share an output name.
    """
    found: dict[str, InputFile] = {}
    for spec in specs:
        for path in _resolve(spec, kind):
            found.setdefault(path, _input(path, kind))
    files = list(found.values())
    check_unique_names(files, kind)
    return files


def _input(path: str, kind: str) -> InputFile:
    """The input for a path: named after its stem, or a MOTChallenge sequence's frames
    (``MOT17-02/img1/`` beside ``MOT17-02/seqinfo.ini``) after the sequence."""
    folder = Path(path)
    if kind == "video" and folder.is_dir() and (folder.parent / "seqinfo.ini").is_file():
        return InputFile(path, kind, folder.parent.name)
    return InputFile.of(path, kind)


def _resolve(spec: str, kind: str) -> list[str]:
    """The files of one spec."""
    path = Path(spec)
    if path.is_dir():  # one listing, no stat per file: a folder of 100,000 files takes ~0.1 s
        suffixes = _SUFFIXES[kind]
        with os.scandir(path) as entries:
            names = [e.name for e in entries if _suffix(e.name) in suffixes and e.is_file()]
        if not names and kind == "video" and frame_files(path):
            return [str(path)]  # a folder of frames: one video
        return [str(path / name) for name in sorted(names)]
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        if not matches:
            logger.warning("inference.%ss: %s matches no file", kind, spec)
        return [str(match) for match in matches]
    if path.is_file():
        return [str(path)]
    raise D2RetrainError(f"inference.{kind}s: {spec} is neither a folder, a file nor a glob that exists")


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def check_unique_names(files: Iterable[InputFile], kind: str) -> None:
    """Refuse two inputs that would write the same outputs.

    Raises:
        D2RetrainError: Naming both files.
    """
    seen: dict[str, str] = {}
    for item in files:
        if item.name in seen:
            raise D2RetrainError(
                f"inference.{kind}s: {seen[item.name]} and {item.path} would both write "
                f"{kind}s/{item.name}.*; rename one of them"
            )
        seen[item.name] = item.path


def frame_files(folder: str | os.PathLike[str]) -> list[str]:
    """The image files of a folder of frames, in name order (the frame order): the paths."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if _suffix(e.name) in IMAGE_SUFFIXES and e.is_file())
    return [os.path.join(folder, name) for name in names]


def track_files(name: str) -> tuple[str, str]:
    """A video's track files under ``videos/`` (with inference.track): the MOTChallenge result
    file and the tracks' description."""
    return f"{name}.tracks.csv", f"{name}.tracks.json"


def output_files(item: InputFile, folder: str = "") -> list[str]:
    """The outputs a file gets under an inference folder (saved frames aside); the first is the
    drawn one (PNG or MP4), the second its predictions (JSON or JSONL).

    Args:
        item: The input.
        folder: The inference folder ("": paths relative to it).
    """
    prefix = f"{folder}/" if folder else ""
    name = item.name
    if item.kind == "image":
        return [f"{prefix}images/{name}.png", f"{prefix}images/{name}.json"]
    return [f"{prefix}videos/{name}.mp4", f"{prefix}videos/{name}.jsonl"]
