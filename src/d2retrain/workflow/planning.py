"""The Snakefile's inference planning: files found once at parse time, stable shards, lost outputs.

Imports nothing heavy (no numpy, torch or OpenCV): Snakemake parses the workflow at every call,
and planning 100,000 files stays within seconds (``benchmarks/bench_plan.py``).
"""

import logging
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from d2retrain.core.errors import D2RetrainError
from d2retrain.data.layout import DemoLayout
from d2retrain.infer.inputs import InputFile, check_unique_names, discover, output_files

logger = logging.getLogger(__name__)

__all__ = [
    "FILES_PER_SHARD",
    "InferencePlan",
    "check_pattern_safe",
    "demo_planned_files",
    "first_missing_output",
    "lost_outputs",
    "shard_count",
    "shard_of",
    "shards",
]

FILES_PER_SHARD = 1000


def demo_planned_files(root: str, counts: Mapping[str, int]) -> dict[str, list[str]]:
    """The files the demo rule writes, so that inference may name them before they exist.

    Args:
        root: The demo dataset's folder (config ``demo.root``).
        counts: Images per split (``{"train": ..., "val": ...}``).

    Returns:
        Folder -> the file names it will hold; the video's path -> ``[]``.
    """
    layout = DemoLayout(Path(root))
    planned = {str(layout.images(split)): layout.image_names(split, count) for split, count in counts.items()}
    return planned | {str(layout.video): []}


class InferencePlan:
    """The files to infer, found once at parse time, and which of them a rule writes first.

    Args:
        images: ``inference.images``: folders, globs or files.
        videos: ``inference.videos``.
        planned: Folders (and files, with ``[]``) that a rule writes before inference
            (:func:`demo_planned_files`): taken as the files they will hold while they do not exist.

    Raises:
        D2RetrainError: A missing input, two inputs with one output name, or a path holding a brace.
    """

    def __init__(
        self, images: Sequence[str], videos: Sequence[str], planned: Mapping[str, Sequence[str]]
    ) -> None:
        planned = {os.path.normpath(key): names for key, names in planned.items()}
        self.files: list[InputFile] = []
        self.planned: set[str] = set()
        for specs, kind in ((images, "image"), (videos, "video")):
            found: dict[str, InputFile] = {}
            for spec in specs:
                for item, to_be_written in self._resolve(spec, kind, planned):
                    found.setdefault(item.path, item)
                    if to_be_written:
                        self.planned.add(item.path)
            check_unique_names(found.values(), kind)
            self.files += found.values()
        check_pattern_safe(self.files)

    @staticmethod
    def _resolve(spec: str, kind: str, planned: Mapping[str, Sequence[str]]) -> list[tuple[InputFile, bool]]:
        key = os.path.normpath(spec)
        if key in planned and not Path(spec).exists():
            paths = [str(Path(spec) / name) for name in planned[key]] if planned[key] else [spec]
            return [(InputFile.of(path, kind), True) for path in paths]
        return [(item, False) for item in discover([spec], kind)]

    def waits_for_a_rule(self, files: Iterable[InputFile]) -> bool:
        """Whether any of ``files`` is written by a rule (the job must wait for it)."""
        return any(item.path in self.planned for item in files)


def tracked_videos(files: Iterable[InputFile], inference: Mapping[str, Any]) -> dict[str, str]:
    """The videos with ground-truth tracks to score (``inference.ground_truth``): name -> file.

    Raises:
        D2RetrainError: Ground truth without ``inference.track``, or for a name that is not one of
            the inference videos.
    """
    truth = dict(inference["ground_truth"])
    if truth and not inference["track"]:
        raise D2RetrainError("inference.ground_truth scores tracks: set inference.track: true too")
    videos = sorted(item.name for item in files if item.kind == "video")
    unknown = sorted(set(truth) - set(videos))
    if unknown:
        raise D2RetrainError(
            f"inference.ground_truth: {', '.join(unknown)} not among the inference videos "
            f"(their names: {', '.join(videos) or 'none'})"
        )
    return truth


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


def lost_outputs(
    groups: Mapping[int, Sequence[InputFile]], inference_folders: Sequence[str]
) -> dict[int, str | None]:
    """Per shard, the first output it has lost since it ran (in any of the subsets' inference
    folders), relative to the inference folder, or None. A shard that never ran has lost nothing.
    """
    lost: dict[int, str | None] = {}
    for shard, items in groups.items():
        lost[shard] = None
        for folder in inference_folders:
            if Path(folder, "status", f"shard_{shard:02d}.json").exists():
                lost[shard] = first_missing_output(items, folder)
                if lost[shard] is not None:
                    break
    return lost
