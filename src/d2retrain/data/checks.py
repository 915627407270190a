"""Warnings about the data that a run would otherwise pass over in silence: val images that are also
training images, balancing that keeps few images, repeat factors that repeat nothing, rare classes.

Each check returns the warnings as sentences that say what was found, with the numbers, and what to
try; :func:`data_warnings` runs them all on a subset's files (the ``stats`` job logs them and writes
them beside the counts, for the report's data section).
"""

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from d2retrain.core.fileio import file_digest
from d2retrain.data.coco import CocoDocument, read_coco
from d2retrain.data.filtering import count_categories
from d2retrain.data.masks import resolve_image_path
from d2retrain.data.repeat import read_repeat_factors

logger = logging.getLogger(__name__)

__all__ = [
    "FEW_INSTANCES",
    "LOW_BALANCE_SHARE",
    "balance_warnings",
    "data_warnings",
    "overlap_warnings",
    "rare_class_warnings",
    "repeat_warnings",
]

LOW_BALANCE_SHARE = 0.25  # balancing that keeps less than this share of the images is named
FEW_INSTANCES = 10  # a class with fewer training instances is named


def overlap_warnings(train: CocoDocument, train_images: str, val: CocoDocument, val_images: str) -> list[str]:
    """Val images that are training images too: the same file name and size, or the same bytes
    (files of equal size are hashed; the others cannot be equal).

    Returns:
        One warning, or none.
    """
    names = {
        (Path(n).name, tuple(s)) for n, s in zip(train.file_names, train.image_sizes.tolist(), strict=True)
    }
    same = {
        n
        for n, s in zip(val.file_names, val.image_sizes.tolist(), strict=True)
        if (Path(n).name, tuple(s)) in names
    }
    same |= _same_bytes(
        train.file_names, train_images, [n for n in val.file_names if n not in same], val_images
    )
    if not same:
        return []
    examples = ", ".join(sorted(same)[:3])
    return [
        f"{len(same)} of the {len(val.file_names)} val images are also training images ({examples}): "
        "their AP measures memory, not generalisation; give val images the training data does not hold "
        "(or one file with val_split)"
    ]


def _same_bytes(
    train_names: Sequence[str], train_dir: str, val_names: Sequence[str], val_dir: str
) -> set[str]:
    sizes: dict[int, list[Path]] = {}
    for name in train_names:
        path = resolve_image_path(train_dir, name)
        if path.is_file():
            sizes.setdefault(os.path.getsize(path), []).append(path)
    digest = functools.cache(file_digest)  # each file hashed once, only where sizes are equal
    same = set()
    for name in val_names:
        path = resolve_image_path(val_dir, name)
        if not path.is_file() or os.path.getsize(path) not in sizes:
            continue
        if any(digest(path) == digest(other) for other in sizes[os.path.getsize(path)] if other != path):
            same.add(name)
    return same


def balance_warnings(filtered: CocoDocument, balanced: CocoDocument) -> list[str]:
    """Balancing (``balance: all``) that keeps less than :data:`LOW_BALANCE_SHARE` of the images."""
    before, after = len(filtered.images), len(balanced.images)
    if before == 0 or after >= LOW_BALANCE_SHARE * before:
        return []
    return [
        f"balance: all keeps {after} of the {before} training images ({after / before:.0%}), those holding "
        "every class; balance: repeat trains on all of them and repeats those of rare classes instead"
    ]


def repeat_warnings(document: CocoDocument, factors: Mapping[int, float], threshold: float) -> list[str]:
    """Repeat factors that are all 1 (no class is rare enough for the threshold), with the threshold
    that would repeat the rarest class."""
    if not factors or max(factors.values()) > 1.0:
        return []
    images = max(1, len(document.images))
    shares = {c.category: c.images / images for c in count_categories(document) if c.images}
    if not shares:
        return []
    rarest = min(shares, key=shares.__getitem__)
    wanted = np.ceil(shares[rarest] * 1000 + 1) / 1000
    return [
        f"balance: repeat repeats no image: every class is on at least repeat_threshold {threshold:g} of the "
        f"images (the rarest, {rarest}, on {shares[rarest]:.1%}); repeat_threshold {wanted:.3g} or more "
        f"would repeat the images of {rarest}"
    ]


def rare_class_warnings(document: CocoDocument, split: str = "training") -> list[str]:
    """Classes with fewer than :data:`FEW_INSTANCES` instances in a (final) split."""
    return [
        f"{count.category} has {count.instances} {split} instance(s) (under {FEW_INSTANCES}): expect a "
        "low, noisy AP for it; add images of it or merge another dataset that has it"
        for count in count_categories(document)
        if count.instances < FEW_INSTANCES
    ]


def data_warnings(
    steps: Mapping[str, Mapping[str, str]],
    image_dirs: Mapping[str, str],
    repeat_threshold: float | None = None,
) -> list[str]:
    """Every check on a subset's data files.

    Args:
        steps: ``{split: {step: COCO file}}`` as the stats job gets them (``filtered`` and
            ``balanced`` steps; ``repeat``: a factor file).
        image_dirs: ``{split: image folder}``.
        repeat_threshold: ``repeat_threshold`` of the subset (with a ``repeat`` step).

    Returns:
        The warnings, each also logged.
    """
    train, val = steps.get("train", {}), steps.get("val", {})
    documents = {
        split: read_coco(files.get("balanced") or files["filtered"])
        for split, files in (("train", train), ("val", val))
        if files.get("balanced") or files.get("filtered")
    }
    warnings: list[str] = []
    if set(documents) == {"train", "val"} and set(image_dirs) >= {"train", "val"}:
        warnings += overlap_warnings(
            documents["train"], image_dirs["train"], documents["val"], image_dirs["val"]
        )
    if "filtered" in train and "balanced" in train:
        warnings += balance_warnings(read_coco(train["filtered"]), documents["train"])
    if "repeat" in train and repeat_threshold is not None:
        warnings += repeat_warnings(
            documents["train"], read_repeat_factors(train["repeat"]), repeat_threshold
        )
    if "train" in documents:
        warnings += rare_class_warnings(documents["train"])
    for warning in warnings:
        logger.warning("data: %s", warning)
    return warnings
