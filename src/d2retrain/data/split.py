"""One annotation file split into train and val: deterministic, every category on both sides."""

import dataclasses
import logging

import numpy as np

from d2retrain.core.errors import D2RetrainError
from d2retrain.data.coco import CocoDocument, read_coco, take_images, write_coco

logger = logging.getLogger(__name__)

__all__ = ["split_document", "split_file", "select_images"]


def select_images(document: CocoDocument, keep: np.ndarray) -> CocoDocument:
    """The images where ``keep`` is true, in the document's order, with their annotations; every
    record's bytes and every top-level key (``info``, ``licenses``, ...) as they were."""
    image_index = np.flatnonzero(keep)
    annotation_index = np.flatnonzero(np.isin(document.table.image_ids, document.image_ids[image_index]))
    return dataclasses.replace(
        take_images(document, image_index),
        annotations=[document.annotations[i] for i in annotation_index],
        table=document.table.take(annotation_index),
    )


def split_document(
    document: CocoDocument, val_fraction: float, seed: int
) -> tuple[CocoDocument, CocoDocument]:
    """Split a document's images into train and val.

    Images are shuffled by ``seed`` (the same seed gives the same split). Categories are then taken
    rarest first: each one with at least 2 images gets one of its images on each side, the first
    of its unassigned images in the shuffled order. The other images fill val up to
    ``round(val_fraction * images)`` in that order (val holds more when the categories need it),
    the rest go to train. Images without annotations are split like the others.

    Returns:
        The train and val documents.

    Raises:
        D2RetrainError: A fraction outside (0, 1), fewer than 2 images, or categories that cannot
            be put on both sides (named).
    """
    count = len(document.images)
    if not 0 < val_fraction < 1:
        raise D2RetrainError(f"{document.source}: the val fraction must be in (0, 1), not {val_fraction}")
    if count < 2:
        raise D2RetrainError(f"{document.source}: {count} image(s) cannot be split into train and val")
    rng = np.random.default_rng(seed)
    rank = np.empty(count, np.int64)
    rank[rng.permutation(count)] = np.arange(count)
    order = np.argsort(document.image_ids, kind="stable")
    table = document.table
    positions = order[np.searchsorted(document.image_ids, table.image_ids, sorter=order)]
    members = {}  # category id (with 2 images or more) -> positions of its images, shuffled order
    for category in document.categories:
        images = np.unique(positions[table.category_ids == category.id])
        if len(images) >= 2:
            members[category.id] = images[np.argsort(rank[images], kind="stable")]
    categories_of: dict[int, list[int]] = {}
    for position, category_id in set(zip(positions.tolist(), table.category_ids.tolist(), strict=True)):
        if category_id in members:
            categories_of.setdefault(position, []).append(category_id)
    target = min(count - 1, max(1, round(val_fraction * count)))  # train keeps one image at least
    sides = _Sides(_first_sides(members, rank, target), members, categories_of)
    sides.separate(rank, rng)
    sides.top_up_val(rank, target)
    side = sides.side
    names = {category.id: category.name for category in document.categories}
    lacking = sorted({names[key] for key, _ in sides.lacking()})
    if lacking:
        raise D2RetrainError(
            f"{document.source}: cannot put an image of each of {', '.join(lacking)} on both sides "
            "(their images are needed by rarer categories); try another seed or val fraction"
        )
    if (side == 1).sum() > target:
        logger.info(
            "val holds %d images, not %d: every category with 2 images or more has one there",
            (side == 1).sum(),
            target,
        )
    return select_images(document, side == 0), select_images(document, side == 1)


def _first_sides(members: dict[int, np.ndarray], rank: np.ndarray, target: int) -> np.ndarray:
    """Rarest category first, one of its unplaced images to each side it lacks; then the other
    images to val up to ``target``, the rest to train, in the shuffled order (0 train, 1 val)."""
    side = np.full(len(rank), -1)
    for key in sorted(members, key=lambda key: (len(members[key]), key)):
        images = members[key]
        for wanted in (1, 0):
            if not (side[images] == wanted).any():
                free = images[side[images] == -1]
                if len(free):
                    side[free[0]] = wanted
    unplaced = np.flatnonzero(side == -1)
    unplaced = unplaced[np.argsort(rank[unplaced], kind="stable")]
    missing = max(0, target - int((side == 1).sum()))
    side[unplaced[:missing]] = 1
    side[unplaced[missing:]] = 0
    return side


class _Sides:
    """Which side each image is on (0 train, 1 val), with each category's image count per side kept
    up to date, so that a move costs the image's categories, not a scan (files of 100,000 images)."""

    def __init__(
        self, side: np.ndarray, members: dict[int, np.ndarray], categories_of: dict[int, list[int]]
    ) -> None:
        self.side = side
        self.categories_of = categories_of
        self.members = members
        self.count = {
            key: [int((side[images] == 0).sum()), int((side[images] == 1).sum())]
            for key, images in members.items()
        }

    def lacking(self) -> list[tuple[int, int]]:
        """(category, side) pairs where a category has no image on that side."""
        return [
            (key, wanted) for key, counts in self.count.items() for wanted in (1, 0) if counts[wanted] == 0
        ]

    def breaks(self, image: int) -> int:
        """Categories that moving ``image`` would leave without an image on its side."""
        here = self.side[image]
        return sum(1 for key in self.categories_of.get(image, ()) if self.count[key][here] == 1)

    def move(self, image: int) -> None:
        """Put ``image`` on the other side."""
        here = self.side[image]
        self.side[image] = 1 - here
        for key in self.categories_of.get(image, ()):
            self.count[key][here] -= 1
            self.count[key][1 - here] += 1

    def separate(self, rank: np.ndarray, rng: np.random.Generator) -> None:
        """Local search (WalkSAT) until every category has an image on each side: the first pass
        can leave a category whose images rarer categories all took to one side, which only a
        chain of moves fixes. Each step moves one image of a lacking category: the one that breaks
        the fewest other categories, or, one step in four, a random one (so that it cannot cycle)."""
        for _ in range(20 * len(self.side) + 1000):
            lacking = self.lacking()
            if not lacking:
                return
            key, _ = lacking[int(rng.integers(len(lacking)))]
            candidates = self.members[key][:256]
            if rng.random() < 0.25:
                image = int(candidates[int(rng.integers(len(candidates)))])
            else:
                image = min((self.breaks(int(i)), rank[i], int(i)) for i in candidates)[2]
            self.move(image)

    def top_up_val(self, rank: np.ndarray, target: int) -> None:
        """Move train images that break no category to val, in the shuffled order, until val holds
        ``target`` images."""
        in_val = int((self.side == 1).sum())
        for image in np.argsort(rank, kind="stable").tolist():
            if in_val >= target:
                return
            if self.side[image] == 0 and self.breaks(image) == 0:
                self.move(image)
                in_val += 1


def split_file(
    input_path: str,
    train_path: str,
    val_path: str,
    val_fraction: float,
    seed: int,
    test_path: str | None = None,
    test_fraction: float = 0.0,
) -> None:
    """Split a COCO file (see :func:`split_document`) and write both sides; with a test fraction,
    first split train from the held-out images (val and test together) the same way, so that
    every category with 2 images or more still has one in train, then the held-out images into
    val and test (each category with 2 of them or more on both).

    Raises:
        D2RetrainError: The input is unusable or cannot be split, or a test path and fraction
            without the other.
    """
    document = read_coco(input_path)
    if (test_path is None) != (test_fraction == 0):
        raise D2RetrainError("a test split needs both its file and a test fraction in (0, 1)")
    test = None
    if test_path is not None:
        if not 0 < test_fraction + val_fraction < 1:
            raise D2RetrainError(
                f"val ({val_fraction}) and test ({test_fraction}) fractions must add up to under 1"
            )
        train, held_out = split_document(document, val_fraction + test_fraction, seed)
        val, test = split_document(held_out, test_fraction / (val_fraction + test_fraction), seed)
    else:
        train, val = split_document(document, val_fraction, seed)
    logger.info(
        "split %s (val fraction %g, seed %d): %d images -> train %d (%d annotations), val %d (%d)%s",
        input_path,
        val_fraction,
        seed,
        len(document.images),
        len(train.images),
        len(train.annotations),
        len(val.images),
        len(val.annotations),
        f", test {len(test.images)} ({len(test.annotations)})" if test else "",
    )
    write_coco(train_path, train)
    write_coco(val_path, val)
    if test is not None and test_path is not None:
        write_coco(test_path, test)
