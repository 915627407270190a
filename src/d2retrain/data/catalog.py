"""What a COCO file holds, to choose classes from: every category's instances and images, and what
balancing would keep of a candidate class list (``d2retrain categories``)."""

import dataclasses
import logging
from collections.abc import Sequence

import pandas as pd

from d2retrain.core.errors import CategoryError, EmptyResultError
from d2retrain.data.coco import CocoDocument, read_coco
from d2retrain.data.filtering import (
    FilterOptions,
    balance_document,
    count_categories,
    filter_document,
    resolve_categories,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CandidateClasses",
    "candidate_classes",
    "category_catalog",
    "check_class_list",
    "source_category_ids",
]


def category_catalog(document: CocoDocument) -> pd.DataFrame:
    """Every category of the file with its id, instances and images, most instances first.

    Args:
        document: The COCO file.

    Returns:
        Columns ``id``, ``category``, ``instances``, ``images``, ``share`` (of the file's images).
    """
    counts = pd.DataFrame(count_categories(document), columns=["category", "instances", "images"])
    counts.insert(0, "id", [category.id for category in document.categories])
    counts["share"] = (counts.images / max(1, len(document.images))).round(3)
    return counts.sort_values(["instances", "category"], ascending=[False, True], ignore_index=True)


@dataclasses.dataclass(frozen=True)
class CandidateClasses:
    """What the workflow's data steps would keep for a class list (default filter options).

    Attributes:
        images: Images of the file.
        with_any: Images the filter keeps (holding at least one of the classes).
        with_all: Images ``balance: all`` keeps (holding every class).
        counts: Instances and images per class after the filter.
    """

    images: int
    with_any: int
    with_all: int
    counts: pd.DataFrame


def candidate_classes(document: CocoDocument, names: Sequence[str]) -> CandidateClasses:
    """Filter the file to ``names`` as the workflow does, and balance it with ``all``.

    Raises:
        CategoryError: A name is not a category of the file, or has no annotation left.
    """
    filtered = filter_document(document, names, FilterOptions())
    try:
        with_all = len(balance_document(filtered, "all").images)
    except EmptyResultError:
        with_all = 0
    counts = pd.DataFrame(count_categories(filtered), columns=["category", "instances", "images"])
    return CandidateClasses(len(document.images), len(filtered.images), with_all, counts)


def source_category_ids(annotations_json: str, classes: Sequence[str]) -> tuple[int, ...]:
    """Original dataset ids of the named categories, as the filter's input file numbers them."""
    return tuple(
        category.id
        for category in resolve_categories(read_coco(annotations_json).categories, classes, annotations_json)
    )


def check_class_list(annotations_json: str, classes: Sequence[str]) -> None:
    """Refuse training when a filtered file's categories are not the class list, in order.

    Raises:
        CategoryError: The names or their order differ.
    """
    found = [category.name for category in read_coco(annotations_json).categories]
    if found != list(classes):
        raise CategoryError(
            f"{annotations_json}: its categories are {found}, not the class list {list(classes)}; "
            "rerun the filter with these categories"
        )
