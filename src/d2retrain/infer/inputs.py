"""Inference inputs: folders and globs resolved to files, output names, and stable shards."""

import dataclasses
import glob
import logging
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from d2retrain.core.errors import D2RetrainError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "InputFile",
    "discover",
    "check_pattern_safe",
    "shard_of",
    "shards",
    "output_files",
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
    def of(cls, path: str | Path, kind: str) -> "InputFile":
        """The input for ``path``, named after its stem."""
        return cls(str(path), kind, Path(path).stem)

    @property
    def pending(self) -> bool:
        """Whether the file does not exist yet (a rule of the workflow writes it)."""
        return not Path(self.path).exists()


def discover(
    specs: Sequence[str], kind: str, planned: Mapping[str, Sequence[str]] | None = None
) -> list[InputFile]:
    """Resolve folders, globs and file names to the files to infer, each once, in order.

    A folder gives its files with a known ``kind`` suffix (not recursive); a glob or a file name
    gives every match, whatever its type (an unsupported one is reported when inferred). A
    folder or file that does not exist yet but that the workflow writes (``planned``: folder ->
    file names it will hold) gives those files.

    Args:
        specs: Folders, globs or files.
        kind: ``image`` or ``video``.
        planned: Folders (and files, with ``[]``) a rule writes before inference.

    Returns:
        The inputs, sorted within each spec.

    Raises:
        D2RetrainError: A folder or file does not exist, or two inputs share an output name.
    """
    planned = {os.path.normpath(key): names for key, names in (planned or {}).items()}
    found: dict[str, InputFile] = {}
    for spec in specs:
        for path in _resolve(spec, kind, planned):
            found.setdefault(str(path), InputFile.of(path, kind))
    files = list(found.values())
    _check_unique_names(files, kind)
    return files


def _resolve(spec: str, kind: str, planned: Mapping[str, Sequence[str]]) -> list[Path]:
    path = Path(spec)
    key = os.path.normpath(spec)
    if key in planned and not path.exists():
        return [path / name for name in planned[key]] if planned[key] else [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES[kind])
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        if not matches:
            logger.warning("inference.%ss: %s matches no file", kind, spec)
        return matches
    if path.is_file():
        return [path]
    raise D2RetrainError(f"inference.{kind}s: {spec} is neither a folder, a file nor a glob that exists")


def _check_unique_names(files: Iterable[InputFile], kind: str) -> None:
    seen: dict[str, str] = {}
    for item in files:
        if item.name in seen:
            raise D2RetrainError(
                f"inference.{kind}s: {seen[item.name]} and {item.path} would both write "
                f"{kind}s/{item.name}.*; rename one of them"
            )
        seen[item.name] = item.path


def check_pattern_safe(files: Iterable[InputFile]) -> None:
    """Refuse files whose paths hold ``{`` or ``}``: Snakemake reads braces in input and output
    paths as wildcards and has no escape for them, so the workflow cannot name such files.

    Raises:
        D2RetrainError: Naming every such file and what to do.
    """
    braced = [item.path for item in files if "{" in item.path or "}" in item.path]
    if braced:
        raise D2RetrainError(
            f"inference: {len(braced)} file(s) with {{ or }} in their path, which Snakemake takes for "
            f"wildcards: {', '.join(braced)}; rename them, or infer them with `d2retrain infer`"
        )


def shard_of(item: InputFile, count: int) -> int:
    """The shard of a file: a hash of its kind and output name, stable across runs and machines."""
    return zlib.crc32(f"{item.kind}/{item.name}".encode()) % count


def shards(files: Iterable[InputFile], count: int) -> dict[int, list[InputFile]]:
    """Group files by :func:`shard_of`; shards without files are left out."""
    groups: dict[int, list[InputFile]] = {}
    for item in files:
        groups.setdefault(shard_of(item, count), []).append(item)
    return dict(sorted(groups.items()))


def output_files(item: InputFile, folder: str) -> list[str]:
    """The outputs a file gets under an inference folder (saved frames aside).

    Args:
        item: The input.
        folder: The inference folder.
    """
    name = item.name
    if item.kind == "image":
        return [f"{folder}/images/{name}.png", f"{folder}/images/{name}.json"]
    return [f"{folder}/videos/{name}.mp4", f"{folder}/videos/{name}.jsonl"]
