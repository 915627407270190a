"""Degenerate geometry: the one rule the filter, the mask renderer and the training reader apply.

The rule (applied by the filter to every annotation it would keep, and by the mask renderer
and the training reader to whatever they are given):

* a polygon with fewer than 3 points or an odd number of coordinates, or with a coordinate
  far outside the image (below ``-S`` or above ``2 * S``, ``S`` the larger of its height and
  width), is removed from its annotation; an annotation left with no polygon is dropped
  (an empty polygon list included);
* an annotation whose box has a width or height <= 0, or a coordinate far outside the
  image, is dropped;
* an RLE whose ``size`` is not the image's ``[height, width]``, or whose ``counts`` (a list,
  or a compressed string) are not non-negative runs adding up to ``height * width``, is
  dropped;
* a polygon of 3 or more points enclosing no area is kept: pycocotools draws it (as an empty
  or one-pixel-wide mask) and ``min_area`` is the way to drop small objects.

The filter logs how many annotations each part of the rule dropped and the first ids. A
segmentation or box of the wrong JSON shape (not a list of lists of numbers, an RLE without
``size`` or ``counts``, a box that is not 4 numbers) is not degenerate but malformed: an
:class:`~d2retrain.core.errors.AnnotationError`.
"""

import functools
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Annotated, TypeGuard

import msgspec
import numpy as np

from d2retrain.core.errors import AnnotationError
from d2retrain.core.forked import in_two_halves
from d2retrain.data.coco import CocoDocument

logger = logging.getLogger(__name__)

__all__ = ["usable_segmentation", "box_problem", "apply_geometry_rule"]


class _Geometry(msgspec.Struct, gc=False):
    segmentation: list[list[float]] | dict
    bbox: tuple[float, float, float, float]


_GEOMETRY = msgspec.json.Decoder(_Geometry)
_SHORT_POLYGON = "polygon with fewer than 3 points"
_ODD_POLYGON = "polygon with an odd number of coordinates"
_NO_POLYGON = "empty polygon list"
_FAR_OUTSIDE = "geometry far outside its image"
_FLAT_BOX = "box with a width or height <= 0"
_RLE_SIZE = "RLE of size other than its image's"
_RLE_COUNTS = "RLE counts not adding up to its image"


def usable_segmentation(
    segmentation: list | dict, height: int, width: int
) -> tuple[list | dict | None, str | None]:
    """Apply the degenerate-geometry rule (see this module's docstring) to one segmentation.

    Args:
        segmentation: Polygons (lists of x, y) or an RLE dict, as decoded from JSON.
        height: Height of its image.
        width: Width of its image.

    Returns:
        What can be drawn (the segmentation itself, its polygons less the degenerate ones,
        or None when nothing is left) and why something was removed (None when nothing was).

    Raises:
        AnnotationError: An RLE dict without an integer ``size`` pair or without ``counts``
            (a list of integers or a string). The message does not say where.
    """
    side = max(height, width)
    return _usable_segmentation(segmentation, height, width, -side, 2 * side)


def box_problem(bbox: Sequence[float], height: int, width: int) -> str | None:
    """Why a COCO ``[x, y, width, height]`` box is degenerate on its image, or None.

    Args:
        bbox: The box.
        height: Height of its image.
        width: Width of its image.

    Returns:
        The part of the rule it breaks (see this module's docstring), or None.
    """
    side = max(height, width)
    return _box_problem(bbox, -side, 2 * side)


def _usable_segmentation(
    segmentation: list | dict, height: int, width: int, low: int, high: int
) -> tuple[list | dict | None, str | None]:
    if isinstance(segmentation, dict):
        problem = _rle_problem(segmentation, height, width)
        return (None, problem) if problem else (segmentation, None)
    for polygon in segmentation:  # the common case first: every polygon is fine
        if len(polygon) < 6 or len(polygon) % 2 or min(polygon) < low or max(polygon) > high:
            break
    else:
        return (segmentation, None) if segmentation else (None, _NO_POLYGON)
    problems = [_polygon_problem(polygon, low, high) for polygon in segmentation]
    kept = [polygon for polygon, problem in zip(segmentation, problems, strict=True) if problem is None]
    return kept or None, next(filter(None, problems))


def _box_problem(bbox: Sequence[float], low: int, high: int) -> str | None:
    x, y, box_width, box_height = bbox
    if not (box_width > 0 and box_height > 0):
        return _FLAT_BOX
    if min(x, y) < low or max(x + box_width, y + box_height) > high:
        return _FAR_OUTSIDE
    return None


def _polygon_problem(polygon: list[float], low: int, high: int) -> str | None:
    if len(polygon) < 6:
        return _SHORT_POLYGON
    if len(polygon) % 2:
        return _ODD_POLYGON
    if min(polygon) < low or max(polygon) > high:
        return _FAR_OUTSIDE
    return None


def _rle_problem(rle: dict, height: int, width: int) -> str | None:
    size, counts = rle.get("size"), rle.get("counts")
    if not (_integers(size) and len(size) == 2 and (isinstance(counts, str) or _integers(counts))):
        raise AnnotationError(
            "an RLE segmentation needs 'size': [height, width] and 'counts': a list of run lengths "
            "or a compressed string"
        )
    if size != [height, width]:
        return _RLE_SIZE
    runs = _runs_of(counts) if isinstance(counts, str) else counts
    if runs is None or min(runs, default=0) < 0 or sum(runs) != height * width:
        return _RLE_COUNTS
    return None


def _integers(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(type(item) is int for item in value)


def _runs_of(counts: str) -> list[int] | None:
    """Run lengths of a compressed RLE string (pycocotools' ``rleFrString``), or None if garbled."""
    runs: list[int] = []
    value = shift = 0
    for character in counts:
        code = ord(character) - 48
        if not 0 <= code < 64 or shift > 35:
            return None
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    return None if shift else runs


@functools.lru_cache(maxsize=1024)
def _clean_decoder(side: int) -> msgspec.json.Decoder:
    """Decodes one annotation's geometry and fails on any polygon shorter than 3 points or with
    a coordinate outside ``[-side, 2 * side]``, and on a box that is flat or starts outside:
    most of the rule, in C."""
    coordinate = Annotated[float, msgspec.Meta(ge=-side, le=2 * side)]
    length = Annotated[float, msgspec.Meta(gt=0)]
    polygon = Annotated[list[coordinate], msgspec.Meta(min_length=6)]
    fields = [("segmentation", list[polygon] | dict), ("bbox", tuple[coordinate, coordinate, length, length])]
    return msgspec.json.Decoder(msgspec.defstruct("CleanGeometry", fields, gc=False))


def _all_clean(annotations: list[msgspec.Raw], rows: np.ndarray) -> bool:
    """Whether no annotation of ``rows`` (position, height, width) breaks the rule: the common
    case, checked with bounds enforced while decoding, one decoder per image size (about 4x
    faster than the pass that finds and names the problems, which runs when this says no)."""
    sides = rows[:, 1:].max(axis=1, initial=0)
    try:
        for side in np.unique(sides).tolist():
            decode, high = _clean_decoder(side).decode, 2 * side
            for position, height, width in rows[sides == side].tolist():
                geometry = decode(annotations[position])
                x, y, box_width, box_height = geometry.bbox
                if x + box_width > high or y + box_height > high:
                    return False
                segmentation = geometry.segmentation
                if type(segmentation) is dict:
                    if _rle_problem(segmentation, height, width):
                        return False
                    continue
                if not segmentation:
                    return False
                for polygon in segmentation:
                    if len(polygon) & 1:
                        return False
    except (msgspec.ValidationError, AnnotationError):
        return False
    return True


def apply_geometry_rule(
    document: CocoDocument, keep: np.ndarray, processes: int = 1
) -> tuple[np.ndarray, dict[int, msgspec.Raw]]:
    """Drop the selected annotations with degenerate geometry, logging how many and why.

    Args:
        document: The document.
        keep: Which annotations the filter keeps so far.
        processes: Check in two processes when this is 2 or more.

    Returns:
        The new selection, and the raw JSON of kept annotations that lost some polygons.

    Raises:
        AnnotationError: A selected annotation's segmentation or box is malformed.
    """
    index = np.flatnonzero(keep)
    order = np.argsort(document.image_ids, kind="stable")
    sizes = document.image_sizes[
        order[np.searchsorted(document.image_ids, document.table.image_ids[index], sorter=order)]
    ]
    rows = np.column_stack([index, sizes]).astype(np.int64, copy=False)
    if all(in_two_halves(functools.partial(_all_clean, document.annotations), rows, processes)):
        return keep, {}
    dropped: Counter[str] = Counter()
    dropped_at: list[int] = []
    rewritten: dict[int, msgspec.Raw] = {}
    for position, height, width, side in zip(
        index.tolist(), *sizes.T.tolist(), sizes.max(axis=1, initial=0).tolist(), strict=True
    ):
        try:
            geometry = _GEOMETRY.decode(document.annotations[position])
            problem = _box_problem(geometry.bbox, -side, 2 * side)
            kept, problem = (
                (None, problem)
                if problem
                else _usable_segmentation(geometry.segmentation, height, width, -side, 2 * side)
            )
        except (msgspec.ValidationError, AnnotationError) as error:
            raise _malformed(document, position, error) from None
        if kept is None:
            assert problem is not None  # a dropped annotation always has its reason
            dropped[problem] += 1
            dropped_at.append(position)
        elif problem is not None:
            rewritten[position] = _with_segmentation(document.annotations[position], kept)
    if dropped or rewritten:
        _log_geometry(document, index.size, dropped, dropped_at, len(rewritten))
    if not dropped:
        return keep, rewritten
    keep = keep.copy()
    keep[dropped_at] = False
    return keep, rewritten


def _malformed(document: CocoDocument, index: int, error: Exception) -> AnnotationError:
    if isinstance(error, msgspec.ValidationError):
        message = str(error).replace("`$.", f"`annotations[{index}].", 1)
    else:
        message = f"segmentation: {error}"
    return AnnotationError(
        f"{document.source}: annotations[{index}] (id {int(document.table.ids[index])}): {message}; "
        "fix or remove this annotation"
    )


def _log_geometry(
    document: CocoDocument, selected: int, dropped: Counter, dropped_at: list[int], trimmed: int
) -> None:
    logger.warning(
        "filter %s: dropped %d of %d annotations with degenerate geometry (%s; first ids %s) and removed "
        "degenerate polygons from %d more; the rule is in d2retrain.data.geometry's docstring",
        document.source,
        dropped.total(),
        selected,
        ", ".join(f"{count} {problem}" for problem, count in dropped.most_common()) or "none",
        ", ".join(str(document.table.ids[position]) for position in dropped_at[:5]) or "-",
        trimmed,
    )


def _with_segmentation(raw: msgspec.Raw, segmentation: list | dict) -> msgspec.Raw:
    fields = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    fields["segmentation"] = msgspec.Raw(msgspec.json.encode(segmentation))
    return msgspec.Raw(msgspec.json.encode(fields))
