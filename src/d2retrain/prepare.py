"""File-level data steps: filter, balance, counts; each reads, transforms and writes atomically."""

import logging
from collections.abc import Sequence

import pandas as pd

from d2retrain.coco import read_coco, write_coco
from d2retrain.filtering import FilterOptions, balance_document, filter_document
from d2retrain.stats import category_counts, format_counts, plot_counts, write_counts_csv

logger = logging.getLogger(__name__)

__all__ = ["filter_file", "balance_file", "write_stats"]


def filter_file(input_path: str, output_path: str, names: Sequence[str], options: FilterOptions) -> None:
    """Filter a COCO file to the named categories (new ids 1..N) and write the result.

    Args:
        input_path: COCO instances file.
        output_path: Destination; written only when the whole result is valid.
        names: Category names in model order.
        options: Area, crowd and negative-image options.

    Raises:
        D2RetrainError: The input is unusable or the result would be empty.
    """
    document = read_coco(input_path)
    filtered = filter_document(document, names, options)
    logger.info(
        "per-category counts, %s -> %s:\n%s",
        input_path,
        output_path,
        format_counts(category_counts(document, names), category_counts(filtered)),
    )
    write_coco(output_path, filtered)


def balance_file(input_path: str, output_path: str, mode: str) -> None:
    """Balance a filtered COCO file (see :func:`balance_document`) and write the result.

    Args:
        input_path: A filtered COCO file.
        output_path: Destination.
        mode: ``none`` or ``all``.

    Raises:
        D2RetrainError: The input is unusable or no image is left.
    """
    document = read_coco(input_path)
    balanced = balance_document(document, mode)
    logger.info(
        "balance %s (%s): %d -> %d images; per-category counts:\n%s",
        input_path,
        mode,
        len(document.images),
        len(balanced.images),
        format_counts(category_counts(document), category_counts(balanced)),
    )
    write_coco(output_path, balanced)


def write_stats(
    steps: dict[str, dict[str, str]], names: Sequence[str], csv_path: str, png_path: str, title: str
) -> pd.DataFrame:
    """Count instances and images per category at each step and write a CSV and a bar chart.

    Args:
        steps: ``{split: {step name: COCO file}}``, in display order.
        names: The chosen category names.
        csv_path: CSV destination.
        png_path: PNG destination.
        title: Chart title.

    Returns:
        The counts table.
    """
    frames = []
    for split, files in steps.items():
        for step, path in files.items():
            counts = category_counts(read_coco(path), names)
            frames.append(counts.assign(split=split, step=step))
    table = pd.concat(frames, ignore_index=True)
    write_counts_csv(csv_path, table)
    plot_counts(png_path, table, title)
    return table
