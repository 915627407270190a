"""Per-category instance and image counts at each data step, as a table and a bar chart."""

import io
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from d2retrain.coco import CocoDocument
from d2retrain.fileio import write_bytes_atomic, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["category_counts", "format_counts", "write_counts_csv", "plot_counts"]

COLUMNS = ["split", "step", "category", "instances", "images"]


def category_counts(document: CocoDocument, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Count instances and images per category.

    Args:
        document: The document to count.
        names: Categories to report, in this order; all of the document's when None.
            A name the document lacks counts zero.

    Returns:
        A frame with columns ``category``, ``instances`` and ``images``.
    """
    by_name = {category.name: category.id for category in document.categories}
    names = list(by_name) if names is None else list(names)
    table = document.table
    rows = []
    for name in names:
        hits = table.category_ids == by_name.get(name, -1)
        rows.append(
            {
                "category": name,
                "instances": int(hits.sum()),
                "images": int(np.unique(table.image_ids[hits]).size),
            }
        )
    return pd.DataFrame(rows, columns=["category", "instances", "images"])


def format_counts(before: pd.DataFrame, after: pd.DataFrame) -> str:
    """Render two count tables side by side, for logs.

    Args:
        before: Counts before a step.
        after: Counts after it.

    Returns:
        A small fixed-width table.
    """
    merged = before.merge(after, on="category", suffixes=(" before", " after"))
    return merged.to_string(index=False)


def write_counts_csv(path: str, counts: pd.DataFrame) -> None:
    """Write a counts table (columns ``split, step, category, instances, images``) atomically."""
    write_text_atomic(path, counts[COLUMNS].to_csv(index=False))


def plot_counts(path: str, counts: pd.DataFrame, title: str) -> None:
    """Draw grouped bar charts of instances and images per category and step.

    Args:
        path: PNG destination.
        counts: Table with the columns of :data:`COLUMNS`.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(counts["split"]))
    figure, axes = plt.subplots(len(splits), 2, figsize=(10, 3.2 * len(splits)), squeeze=False)
    for row, split in enumerate(splits):
        part = counts[counts["split"] == split]
        for column, measure in enumerate(("instances", "images")):
            pivot = part.pivot(index="category", columns="step", values=measure)
            pivot = pivot.loc[list(dict.fromkeys(part["category"])), list(dict.fromkeys(part["step"]))]
            pivot.plot.bar(
                ax=axes[row][column],
                rot=0,
                logy=bool(pivot.to_numpy().max() > 50 * max(1, pivot.to_numpy().min())),
            )
            axes[row][column].set_title(f"{split}: {measure}")
            axes[row][column].set_xlabel("")
            for container in axes[row][column].containers:
                axes[row][column].bar_label(container, fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
