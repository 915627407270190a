"""Runs of a benchmark's sides in turn, the order alternating, so that drifts of the machine fall on all."""

import logging
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

__all__ = ["alternating"]

T = TypeVar("T")


def alternating(sides: dict[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
    """Run every side ``repeats`` times: in the given order, then reversed, and so on.

    Args:
        sides: Name -> a function that runs that side once and returns its measurement.
        repeats: Runs of each side.

    Returns:
        Each side's measurements, in run order (the i-th of each side come from the same round).
    """
    results: dict[str, list[T]] = {name: [] for name in sides}
    for repeat in range(repeats):
        for name in sides if repeat % 2 == 0 else reversed(sides):
            results[name].append(sides[name]())
    return results
