"""The size each engine resizes an image to before its network, and which images may share a batch.

Without PyTorch: the exported models' pre-processing (:mod:`d2retrain.model.exported`) uses the same
functions as the engines' predictors, so an export resizes every image to the size its PyTorch model
uses. A batch is padded to its largest image; images whose padded sizes are equal get exactly the
input they would get alone, so only they share a forward pass (:func:`predict_in_groups`) and a
file's predictions never depend on the files beside it.
"""

import logging
import math
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

logger = logging.getLogger(__name__)

__all__ = ["RESIZE_RULES", "padded_size", "predict_in_groups", "resized_size"]

T = TypeVar("T")
R = TypeVar("R")

RESIZE_RULES = ("detectron2", "torchvision")


def resized_size(height: int, width: int, shortest_edge: int, max_size: int, rule: str) -> tuple[int, int]:
    """The (height, width) an engine resizes an image to at test time.

    Args:
        height: The image's height.
        width: Its width.
        shortest_edge: The test size of the shorter side (``min_size_test``).
        max_size: The cap on the longer side (``max_size_test``).
        rule: ``detectron2`` (``ResizeShortestEdge.get_output_shape``: rounded to the nearest pixel)
            or ``torchvision`` (``GeneralizedRCNNTransform`` in eager mode: one scale computed in
            double precision, sizes floored).

    Returns:
        The resized height and width.

    Raises:
        ValueError: An unknown rule.
    """
    if rule == "detectron2":
        scale = shortest_edge / min(height, width)
        new_height, new_width = height * scale, width * scale
        if max(new_height, new_width) > max_size:
            scale = max_size / max(new_height, new_width)
            new_height, new_width = new_height * scale, new_width * scale
        return int(new_height + 0.5), int(new_width + 0.5)
    if rule == "torchvision":
        scale = min(float(shortest_edge) / min(height, width), float(max_size) / max(height, width))
        return math.floor(float(height) * scale), math.floor(float(width) * scale)
    raise ValueError(f"unknown resize rule {rule!r}; one of {', '.join(RESIZE_RULES)}")


def padded_size(size: Sequence[int], divisor: int) -> tuple[int, int]:
    """``(height, width)`` rounded up to multiples of ``divisor``: what a batch of it is padded to."""
    height, width = int(size[0]), int(size[1])
    if divisor <= 1:
        return height, width
    return math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor


def predict_in_groups(
    items: Sequence[T], keys: Sequence[Hashable], predict: Callable[[list[T]], list[R]]
) -> list[R]:
    """``predict`` on the items of equal key together, one call per key; results in the items' order.

    Args:
        items: The images (or their inputs).
        keys: One key per item: its padded input size (:func:`padded_size`).
        predict: Predicts a list of items in one forward pass, a result per item.

    Returns:
        One result per item, in order.
    """
    groups: dict[Hashable, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    results: list[R | None] = [None] * len(items)
    for positions in groups.values():
        found = predict([items[position] for position in positions])
        for position, result in zip(positions, found, strict=True):
            results[position] = result
    return results  # type: ignore[return-value]  # every position was filled
