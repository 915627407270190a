"""Figures and tables of the HTML report: the per-class AP table and a grid of val predictions."""

import html
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from d2retrain.core.fileio import write_figure, write_text_atomic
from d2retrain.core.htmlpage import html_page
from d2retrain.data.images import read_image
from d2retrain.data.records import load_records
from d2retrain.infer.draw import draw_instances

logger = logging.getLogger(__name__)

__all__ = ["ap_table", "ap_notes", "html_page", "write_ap_table", "write_prediction_grid"]


def ap_table(metrics: dict[str, dict], per_class: pd.DataFrame) -> pd.DataFrame:
    """AP in percent per kind (bbox, segm) and class, one column per model, plus the change.

    Args:
        metrics: ``metrics.json`` of the evaluate rule (``{model: report}``).
        per_class: Its ``per_class.csv`` (model, kind, class, AP).

    Returns:
        Rows ``(kind, class)`` with ``all classes`` first in each kind; columns the models
        (``baseline`` before ``retrained`` when both exist) and ``change`` when there are two.
    """
    overall = pd.DataFrame(
        [
            {"model": model, "kind": kind, "class": "all classes", "AP": report[kind]["AP"]}
            for model, report in metrics.items()
            for kind in ("bbox", "segm")
        ]
    )
    rows = pd.concat([overall, per_class], ignore_index=True)
    table = rows.pivot_table(index=["kind", "class"], columns="model", values="AP", sort=False) * 100
    models = [model for model in ("baseline", "retrained") if model in table.columns]
    table = table[models]
    if len(models) == 2:
        table["change"] = table["retrained"] - table["baseline"]
    table.columns.name = None
    return table


def ap_notes(metrics: dict[str, dict]) -> list[str]:
    """What the AP table's columns are: which weights were evaluated, and why there is no
    baseline or what it covers."""
    retrained = metrics["retrained"]
    notes = []
    weights = retrained.get("weights")
    if weights and weights.get("iteration") is not None:
        which = "the best val segm AP of the evaluations during training" if weights["best"] else "the last"
        notes.append(
            f"Retrained: {weights['file']}, the weights of iteration {weights['iteration']} ({which})."
        )
    notes += [f"Warning: {warning}" for warning in retrained.get("warnings", [])]
    if "no_baseline" in retrained:
        notes.append(f"No baseline: {retrained['no_baseline']}.")
    elif "baseline" in metrics:
        covered = sorted(metrics["baseline"].get("per_class", {}).get("segm", {}))
        named = f" ({', '.join(covered)})" if covered else ""
        notes.append(
            "Baseline: the COCO base weights before training, on the classes named as COCO categories"
            f"{named}; its 'all classes' row covers those only."
        )
    return notes


def write_ap_table(metrics_path: str, per_class_path: str, html_path: str, title: str) -> None:
    """Write the AP table (see :func:`ap_table`) as a small HTML page for the report.

    Args:
        metrics_path: ``metrics.json`` of the evaluate rule.
        per_class_path: Its ``per_class.csv``.
        html_path: The page to write.
        title: Heading of the page.
    """
    metrics = json.loads(Path(metrics_path).read_text())
    table = ap_table(metrics, pd.read_csv(per_class_path))
    body = table.to_html(float_format="{:.1f}".format, na_rep="-", classes="ap")
    notes = "".join(f"<p>{html.escape(note)}</p>" for note in ap_notes(metrics))
    page = html_page(title, f"<h3>{html.escape(title)}</h3><p>COCO AP (%) on the val split.</p>{notes}{body}")
    write_text_atomic(html_path, page)
    logger.info("AP table: %d rows -> %s", len(table), html_path)


def write_prediction_grid(
    model_dir: str,
    val_json: str,
    val_images: str,
    classes: Sequence[str],
    png_path: str,
    count: int = 12,
    score_threshold: float = 0.5,
    device: str = "auto",
    threads: int = 1,
) -> None:
    """Draw the model's predictions on the first ``count`` val images (by image id) in a grid.

    Args:
        model_dir: A model folder.
        val_json: Filtered val annotations.
        val_images: Their image folder.
        classes: Class names in model order (checked against the model).
        png_path: The figure to write.
        count: Images shown.
        score_threshold: Lowest score drawn.
        device: ``auto``, ``cpu`` or ``cuda``.
        threads: CPU threads.

    Raises:
        D2RetrainError: No ``classes.json``, other classes, or missing images.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from d2retrain.model.engines import load_predictor

    torch.set_num_threads(max(1, threads))
    predictor, info = load_predictor(model_dir, list(classes), device=device, score_threshold=score_threshold)
    records = sorted(load_records(val_json, val_images, require_annotations=False), key=lambda r: r.image_id)
    records = records[:count]
    columns = min(4, max(1, len(records)))
    rows = max(1, math.ceil(len(records) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, record in zip(axes.flat, records, strict=False):
        image = read_image(record.path)
        instances = predictor(image)
        drawn = draw_instances(image, instances, info.classes)
        axis.imshow(np.ascontiguousarray(drawn[:, :, ::-1]))
        axis.set_title(f"{Path(record.path).name}: {len(instances)} found", fontsize=8)
    write_figure(png_path, figure, f"predictions on val images (score >= {score_threshold})")
    logger.info("prediction grid of %d val images -> %s", len(records), png_path)
