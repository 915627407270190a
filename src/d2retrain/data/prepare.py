"""File-level data steps: filter, balance, counts; each reads, transforms and writes atomically."""

import logging
from collections.abc import Sequence

from d2retrain.data.coco import read_coco, write_coco
from d2retrain.data.filtering import (
    CategoryCount,
    FilterOptions,
    balance_document,
    count_categories,
    filter_document,
)

logger = logging.getLogger(__name__)

__all__ = ["filter_file", "balance_file", "format_counts"]


def filter_file(
    input_path: str, output_path: str, names: Sequence[str], options: FilterOptions, processes: int = 1
) -> None:
    """Filter a COCO file to the named categories (new ids 1..N) and write the result.

    Args:
        input_path: COCO instances file.
        output_path: Destination; written only when the whole result is valid.
        names: Category names in model order.
        options: Area, crowd and negative-image options.
        processes: Decode and check large files in two processes when this is 2 or more.

    Raises:
        D2RetrainError: The input is unusable or the result would be empty.
    """
    document = read_coco(input_path, processes)
    filtered = filter_document(document, names, options, processes)
    logger.info(
        "per-category counts, %s -> %s:\n%s",
        input_path,
        output_path,
        format_counts(count_categories(document, names), count_categories(filtered)),
    )
    write_coco(output_path, filtered)


def balance_file(input_path: str, output_path: str, mode: str, processes: int = 1) -> None:
    """Balance a filtered COCO file (see :func:`balance_document`) and write the result.

    Args:
        input_path: A filtered COCO file.
        output_path: Destination.
        mode: ``none`` or ``all``.
        processes: Decode large files in two processes when this is 2 or more.

    Raises:
        D2RetrainError: The input is unusable or no image is left.
    """
    document = read_coco(input_path, processes)
    balanced = balance_document(document, mode)
    logger.info(
        "balance %s (%s): %d -> %d images; per-category counts:\n%s",
        input_path,
        mode,
        len(document.images),
        len(balanced.images),
        format_counts(count_categories(document), count_categories(balanced)),
    )
    write_coco(output_path, balanced)


def format_counts(before: list[CategoryCount], after: list[CategoryCount]) -> str:
    """Render per-category counts before and after a step as a small table, for logs.

    Args:
        before: Counts before the step.
        after: Counts after it, same categories by name.

    Returns:
        Fixed-width text, one row per category.
    """
    after_by_name = {row.category: row for row in after}
    width = max(len("category"), *(len(row.category) for row in before))
    lines = [f"{'category':>{width}}  instances before  images before  instances after  images after"]
    for row in before:
        new = after_by_name.get(row.category, CategoryCount(row.category, 0, 0))
        numbers = f"{row.instances:>16}  {row.images:>13}  {new.instances:>15}  {new.images:>12}"
        lines.append(f"{row.category:>{width}}  {numbers}")
    return "\n".join(lines)
