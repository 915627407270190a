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
    "FILES_PER_SHARD",
    "shard_count",
    "shard_of",
    "shards",
    "output_files",
    "first_missing_output",
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
        planned: The file did not exist when found: a rule of the workflow writes it.
    """

    path: str
    kind: str
    name: str
    planned: bool = dataclasses.field(default=False, compare=False)

    @classmethod
    def of(cls, path: str | os.PathLike[str], kind: str, planned: bool = False) -> "InputFile":
        """The input for ``path``, named after its stem."""
        path = os.fspath(path)
        return cls(path, kind, os.path.splitext(os.path.basename(path))[0], planned)


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
        paths, to_be_written = _resolve(spec, kind, planned)
        for path in paths:
            if path not in found:
                found[path] = InputFile.of(path, kind, to_be_written)
    files = list(found.values())
    _check_unique_names(files, kind)
    return files


def _resolve(spec: str, kind: str, planned: Mapping[str, Sequence[str]]) -> tuple[list[str], bool]:
    """The files of one spec, and whether they are still to be written by the workflow."""
    path = Path(spec)
    key = os.path.normpath(spec)
    if key in planned and not path.exists():
        return ([str(path / name) for name in planned[key]] if planned[key] else [str(path)]), True
    if path.is_dir():  # one listing, no stat per file: a folder of 100,000 files takes ~0.1 s
        suffixes = _SUFFIXES[kind]
        with os.scandir(path) as entries:
            names = [e.name for e in entries if _suffix(e.name) in suffixes and e.is_file()]
        return [str(path / name) for name in sorted(names)], False
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        if not matches:
            logger.warning("inference.%ss: %s matches no file", kind, spec)
        return [str(match) for match in matches], False
    if path.is_file():
        return [str(path)], False
    raise D2RetrainError(f"inference.{kind}s: {spec} is neither a folder, a file nor a glob that exists")


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


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


FILES_PER_SHARD = 1000


def shard_count(files: int, setting: int | str) -> int:
    """The shards for ``files`` files: ``setting`` itself, or for ``auto`` one per
    :data:`FILES_PER_SHARD` files rounded up to a power of two (which changes only when the files
    double or halve, since a new count moves most files to another shard)."""
    if setting != "auto":
        return int(setting)
    needed = max(1, -(-files // FILES_PER_SHARD))
    return 1 << (needed - 1).bit_length()


def shards(files: Iterable[InputFile], count: int | str) -> dict[int, list[InputFile]]:
    """Group files by :func:`shard_of` into ``count`` shards (or :func:`shard_count`'s for
    ``auto``); shards without files are left out."""
    files = list(files)
    total = shard_count(len(files), count)
    groups: dict[int, list[InputFile]] = {}
    for item in files:
        groups.setdefault(shard_of(item, total), []).append(item)
    return dict(sorted(groups.items()))


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


def first_missing_output(items: Iterable[InputFile], folder: str | os.PathLike[str]) -> str | None:
    """The first output of ``items`` missing under the inference ``folder``, relative to it, or
    None when every one is there. One listing per output folder rather than a lookup per file:
    100,000 files cost a fraction of a second.
    """
    listed: dict[str, set[str]] = {}
    for item in items:
        for path in output_files(item):
            kind_folder, name = path.split("/", 1)
            if kind_folder not in listed:
                try:
                    listed[kind_folder] = set(os.listdir(Path(folder, kind_folder)))
                except FileNotFoundError:
                    listed[kind_folder] = set()
            if name not in listed[kind_folder]:
                return path
    return None
