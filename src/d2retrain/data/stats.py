"""Per-category instance and image counts at each data step, as a table and a bar chart."""

import html
import logging
from collections.abc import Sequence

import pandas as pd

from d2retrain.core.fileio import write_figure, write_text_atomic
from d2retrain.core.htmlpage import html_page
from d2retrain.data.checks import data_warnings
from d2retrain.data.coco import CocoDocument, read_coco
from d2retrain.data.filtering import count_categories
from d2retrain.data.repeat import expected_counts, read_repeat_factors

logger = logging.getLogger(__name__)

__all__ = ["category_counts", "write_counts_csv", "plot_counts", "write_data_checks", "write_stats"]

COLUMNS = ["split", "dataset", "step", "category", "instances", "images"]
REPEAT_STEP = "repeat"  # balance: repeat: expected per epoch
DATASET_STEP = "dataset_"  # one of several merged datasets' own file


def category_counts(document: CocoDocument, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Count instances and images per category, as a frame (see :func:`count_categories`).

    Args:
        document: The document to count.
        names: Categories to report, in this order; all of the document's when None.

    Returns:
        A frame with columns ``category``, ``instances`` and ``images``.
    """
    return pd.DataFrame(count_categories(document, names), columns=["category", "instances", "images"])


def write_counts_csv(path: str, counts: pd.DataFrame) -> None:
    """Write a counts table (columns ``split, dataset, step, category, instances, images``) atomically."""
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
    write_figure(path, figure, title)


def write_stats(
    steps: dict[str, dict[str, str]],
    names: Sequence[str],
    csv_path: str,
    png_path: str,
    title: str,
    aliases: dict[str, dict[str, str]] | None = None,
) -> pd.DataFrame:
    """Count instances and images per category at each step and write a CSV and a bar chart.

    Args:
        steps: ``{split: {step name: COCO file}}``, in display order; a step named
            :data:`REPEAT_STEP` is a repeat-factor file instead, counted as the instances and
            images an epoch is expected to show (fractional) of the step before it; a step named
            ``dataset_<name>`` is one of several merged datasets' own file, counted under its
            aliases and shown as ``input: <name>``.
        aliases: The subset's datasets, in order, with their aliases (``{name: {theirs: ours}}``);
            they fill the ``dataset`` column (``merged`` for the steps after a merge).
        names: The chosen category names.
        csv_path: CSV destination.
        png_path: PNG destination.
        title: Chart title.

    Returns:
        The counts table.
    """
    aliases = aliases or {}
    label = "merged" if len(aliases) > 1 else next(iter(aliases), "")
    frames = []
    for split, files in steps.items():
        document = None
        for step, path in files.items():
            if step.startswith(DATASET_STEP):
                dataset = step.removeprefix(DATASET_STEP)
                theirs = {ours: their for their, ours in aliases.get(dataset, {}).items()}
                counts = category_counts(read_coco(path), [theirs.get(name, name) for name in names])
                counts["category"] = list(names)
                frames.append(counts.assign(split=split, step=f"input: {dataset}", dataset=dataset))
                continue
            if step == REPEAT_STEP:  # a factor file: the split's last file, each image r times
                assert document is not None, "the repeat step follows a COCO file of its split"
                expected = expected_counts(document, read_repeat_factors(path))
                expected = expected[expected.category.isin(names)]
                counts = (
                    expected[["category", "expected_instances", "expected_images"]]
                    .set_axis(["category", "instances", "images"], axis=1)
                    .round(1)
                )
            else:
                document = read_coco(path)
                counts = category_counts(document, names)
            frames.append(counts.assign(split=split, step=step, dataset=label))
    table = pd.concat(frames, ignore_index=True)
    write_counts_csv(csv_path, table)
    plot_counts(png_path, table, title)
    return table


def write_data_checks(
    steps: dict[str, dict[str, str]],
    image_dirs: dict[str, str],
    html_path: str,
    title: str,
    repeat_threshold: float | None = None,
) -> list[str]:
    """Run the data checks (:func:`d2retrain.data.checks.data_warnings`), log the warnings and
    write them as a page for the report's data section ("no warnings" when there is none).

    Returns:
        The warnings.
    """
    warnings = data_warnings(steps, image_dirs, repeat_threshold)
    items = "".join(f"<li>{html.escape(warning)}</li>" for warning in warnings)
    body = f"<ul>{items}</ul>" if warnings else "<p>No warnings: the checks found nothing to report.</p>"
    heading = f"<h3>Data checks: {html.escape(title)}</h3>"
    write_text_atomic(html_path, html_page(f"Data checks: {title}", heading + body))
    logger.info("data checks: %d warning(s)", len(warnings))
    return warnings
