"""Filter a COCO document to chosen categories and balance it: pure transforms.

The filter drops degenerate geometry by the rule in :mod:`d2retrain.data.geometry`.
"""

import dataclasses
import difflib
import logging
from collections.abc import Sequence
from typing import NamedTuple

import msgspec
import numpy as np

from d2retrain.core.config import allowed_values
from d2retrain.core.errors import AnnotationError, CategoryError, EmptyResultError
from d2retrain.data.coco import AnnotationTable, Category, CocoDocument, renumber_category, take_images
from d2retrain.data.geometry import apply_geometry_rule

logger = logging.getLogger(__name__)

__all__ = [
    "CategoryCount",
    "count_categories",
    "FilterOptions",
    "BALANCE_MODES",
    "resolve_categories",
    "filter_document",
    "balance_document",
]

BALANCE_MODES = allowed_values("subsets.*.balance")  # one function per mode below


@dataclasses.dataclass(frozen=True)
class FilterOptions:
    """What the filter keeps besides the chosen categories.

    Attributes:
        min_area: Drop annotations whose ``area`` is below this (0 keeps all).
        drop_crowd: Drop ``iscrowd`` annotations.
        keep_empty_images: Keep images with no kept annotation, as negatives.
    """

    min_area: float = 0.0
    drop_crowd: bool = False
    keep_empty_images: bool = False


class CategoryCount(NamedTuple):
    """Instances and images of one category."""

    category: str
    instances: int
    images: int


def count_categories(document: CocoDocument, names: Sequence[str] | None = None) -> list[CategoryCount]:
    """Count instances and images per category.

    Args:
        document: The document to count.
        names: Categories to report, in this order; all of the document's when None.
            A name the document lacks counts zero.

    Returns:
        One count per category.
    """
    by_name = {category.name: category.id for category in document.categories}
    table = document.table
    counts = []
    for name in by_name if names is None else names:
        hits = table.category_ids == by_name.get(name, -1)
        counts.append(CategoryCount(name, int(hits.sum()), int(np.unique(table.image_ids[hits]).size)))
    return counts


def resolve_categories(categories: Sequence[Category], names: Sequence[str], source: str) -> list[Category]:
    """Look up categories by name, in the order given.

    Args:
        categories: The categories of a document.
        names: Names to find; their order is the class order of the model.
        source: File name used in error messages.

    Returns:
        The matching categories, in the order of ``names``.

    Raises:
        CategoryError: A name is unknown (close matches are suggested), repeated, or
            ``names`` is empty.
    """
    if not names:
        raise CategoryError("no categories chosen; name at least one, e.g. -c person")
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise CategoryError(f"categories named more than once: {', '.join(repeated)}")
    by_name = {category.name: category for category in categories}
    chosen = []
    for name in names:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise CategoryError(f"{source}: no category named {name!r}{hint}")
        chosen.append(by_name[name])
    return chosen


def filter_document(
    document: CocoDocument, names: Sequence[str], options: FilterOptions, processes: int = 1
) -> CocoDocument:
    """Keep the annotations of the named categories, renumbered 1..N in the given order.

    Images with at least one kept annotation are kept (all images with
    ``keep_empty_images``); images and annotations keep every field and their ids, and
    come out sorted by id. Annotations with degenerate geometry are dropped, or lose their
    degenerate polygons, by the rule of :mod:`d2retrain.data.geometry`; the log says how many.

    Args:
        document: The input document.
        names: Category names; their order sets the new ids 1..N.
        options: Area, crowd and negative-image options.
        processes: Check the geometry in two processes when this is 2 or more.

    Returns:
        The filtered document.

    Raises:
        CategoryError: A name is unknown, or a chosen category keeps no annotation.
        AnnotationError: ``min_area`` is set but an annotation has no ``area``, or a kept
            annotation's ``segmentation`` or ``bbox`` is malformed.
        EmptyResultError: Nothing is left.
    """
    chosen = resolve_categories(document.categories, names, document.source)
    old_ids = np.array([category.id for category in chosen], dtype=np.int64)
    selected = _annotation_mask(document, old_ids, options)
    keep, rewritten = apply_geometry_rule(document, selected, processes)
    narrowed_by = ["the area and crowd options"] if options != FilterOptions() else []
    narrowed_by += ["the degenerate-geometry rule (see the log)"] if keep is not selected else []
    _check_categories_kept(document, chosen, keep, narrowed_by)
    index = np.flatnonzero(keep)
    index = index[np.argsort(document.table.ids[index], kind="stable")]
    annotations, table = _renumbered(document, index, old_ids, rewritten)
    image_mask = None if options.keep_empty_images else np.isin(document.image_ids, table.image_ids)
    filtered = _with_records(
        document,
        annotations=annotations,
        table=table,
        image_mask=image_mask,
        categories=[
            Category(id=position + 1, name=category.name, supercategory=category.supercategory)
            for position, category in enumerate(chosen)
        ],
    )
    logger.info(
        "filter %s: kept %d of %d annotations and %d of %d images for %s",
        document.source,
        len(annotations),
        len(document.annotations),
        len(filtered.images),
        len(document.images),
        ", ".join(names),
    )
    return filtered


def _renumbered(
    document: CocoDocument, index: np.ndarray, old_ids: np.ndarray, rewritten: dict[int, msgspec.Raw]
) -> tuple[list[msgspec.Raw], AnnotationTable]:
    """The records at ``index`` (trimmed ones from ``rewritten``) and their table, with category
    ids renumbered to 1 + the place of their old id in ``old_ids``; only the records whose id
    changes are touched."""
    table = document.table.take(index)
    order = np.argsort(old_ids)
    new_ids = order[np.searchsorted(old_ids, table.category_ids, sorter=order)] + 1
    positions = index.tolist()
    annotations = [document.annotations[i] for i in positions]
    if rewritten:
        annotations = [rewritten.get(i, raw) for i, raw in zip(positions, annotations, strict=True)]
    for at in np.flatnonzero(new_ids != table.category_ids).tolist():
        annotations[at] = renumber_category(annotations[at], int(new_ids[at]))
    return annotations, dataclasses.replace(table, category_ids=new_ids)


def _check_categories_kept(
    document: CocoDocument, chosen: list[Category], keep: np.ndarray, narrowed_by: list[str]
) -> None:
    kept_categories = document.table.category_ids[keep]
    for category in chosen:
        if not np.any(kept_categories == category.id):
            raise CategoryError(
                f"{document.source}: category {category.name!r} has no annotations"
                f"{' left after ' + ' and '.join(narrowed_by) if narrowed_by else ''}"
                "; drop it from the list or use another dataset"
            )


def _annotation_mask(document: CocoDocument, category_ids: np.ndarray, options: FilterOptions) -> np.ndarray:
    table = document.table
    keep = np.isin(table.category_ids, category_ids)
    if options.drop_crowd:
        keep &= ~table.iscrowd
    if options.min_area > 0:
        missing = keep & np.isnan(table.area)
        if missing.any():
            index = int(np.argmax(missing))
            raise AnnotationError(
                f"{document.source}: annotations[{index}] has no 'area', so min_area cannot be applied"
            )
        keep &= table.area >= options.min_area
    return keep


def balance_document(document: CocoDocument, mode: str) -> CocoDocument:
    """Keep only images that hold every category (mode ``all``), with all their annotations.

    Args:
        document: A filtered document.
        mode: ``none`` and ``repeat`` return the document unchanged (``repeat`` balances by
            sampling: :mod:`d2retrain.data.repeat`); ``all`` keeps images holding at least one
            instance of every category.

    Returns:
        The balanced document: images sorted by id, annotations in input order.

    Raises:
        ValueError: ``mode`` is not a balance mode (a bug: config validation stops it first).
        EmptyResultError: No image holds every category.
    """
    if mode in ("none", "repeat"):
        return document
    if mode != "all":
        raise ValueError(f"unknown balance mode {mode!r}; expected one of {BALANCE_MODES}")
    table = document.table
    image_ids, category_counts = np.unique(_image_of_each_distinct_pair(table), return_counts=True)
    keep_images = image_ids[category_counts == len(document.categories)]
    if keep_images.size == 0:
        names = ", ".join(category.name for category in document.categories)
        raise EmptyResultError(
            f"{document.source}: no image holds every category ({names}); use balance: none"
        )
    keep = np.isin(table.image_ids, keep_images)
    index = np.flatnonzero(keep)
    return _with_records(
        document,
        annotations=[document.annotations[i] for i in index],
        table=table.take(index),
        image_mask=np.isin(document.image_ids, keep_images),
        categories=document.categories,
    )


def _image_of_each_distinct_pair(table: AnnotationTable) -> np.ndarray:
    """The image id of each distinct (image id, category id) pair."""
    span = int(table.category_ids.max(initial=0)) + 1
    if int(table.image_ids.max(initial=0)) < np.iinfo(np.int64).max // span - span:
        # one int64 key per pair: a 1-D unique, several times faster than unique(axis=1)
        return np.unique(table.image_ids * span + table.category_ids) // span
    return np.unique(np.stack([table.image_ids, table.category_ids]), axis=1)[0]


def _with_records(
    document: CocoDocument,
    annotations: list,
    table: AnnotationTable,
    image_mask: np.ndarray | None,
    categories: list[Category],
) -> CocoDocument:
    if not annotations:
        raise EmptyResultError(f"{document.source}: no annotation is left")
    image_index = np.arange(len(document.images)) if image_mask is None else np.flatnonzero(image_mask)
    image_index = image_index[np.argsort(document.image_ids[image_index], kind="stable")]
    return dataclasses.replace(
        take_images(document, image_index), annotations=annotations, table=table, categories=categories
    )
