"""COCO AP (bbox and segm, overall and per class) of a predictor on a validation split."""

import contextlib
import io
import json
import logging
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from d2retrain.core.fileio import write_text_atomic
from d2retrain.data.images import read_image
from d2retrain.data.records import load_records
from d2retrain.model.instances import Instances, Predictor

logger = logging.getLogger(__name__)

__all__ = [
    "SUMMARY_KEYS",
    "to_coco_results",
    "predict_split",
    "coco_ap",
    "evaluate",
    "progress_record",
    "write_evaluation",
]

SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(image_id: int | None, instances: Instances, category_ids: Sequence[int]) -> list[dict]:
    """Instances of one image in COCO results format (RLE masks, xywh boxes).

    Args:
        image_id: The image's id (None: left out, for files outside a dataset).
        instances: Predictions.
        category_ids: Category id of each class index.

    Returns:
        One dict per instance.
    """
    if not len(instances):
        return []
    rles = mask_utils.encode(_fortran_masks(instances.masks))
    results = []
    for box, score, label, rle in zip(
        instances.boxes, instances.scores, instances.classes, rles, strict=True
    ):
        x0, y0, x1, y1 = (float(v) for v in box)
        record: dict[str, Any] = {} if image_id is None else {"image_id": image_id}
        record |= {
            "category_id": int(category_ids[int(label)]),
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "score": round(float(score), 5),
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
        }
        results.append(record)
    return results


def _fortran_masks(masks: np.ndarray) -> np.ndarray:
    """``(K, H, W)`` booleans as the Fortran-ordered ``(H, W, K)`` uint8 array pycocotools
    encodes in one call; OpenCV transposes each mask (7x faster than numpy's copy)."""
    count, height, width = masks.shape
    transposed = np.empty((count, width, height), np.uint8)
    for index in range(count):
        cv2.transpose(np.ascontiguousarray(masks[index]).view(np.uint8), dst=transposed[index])
    return transposed.transpose(2, 1, 0)


def predict_split(
    predictor: Predictor, annotations_json: str, image_dir: str, classes: Sequence[str]
) -> list[dict]:
    """Predict every image of a split; category ids are 1..N as in the filtered file."""
    records = load_records(annotations_json, image_dir, require_annotations=False)
    results: list[dict] = []
    for record in tqdm(records, desc="evaluate", unit="img", disable=None):
        results += to_coco_results(
            record.image_id, predictor(read_image(record.path)), range(1, len(classes) + 1)
        )
    return results


def coco_ap(
    ground_truth: COCO,
    results: list[dict],
    kind: str,
    classes: Sequence[str],
    only: Sequence[str] | None = None,
) -> tuple[dict, dict]:
    """Run COCOeval for ``bbox`` or ``segm``, over every class or ``only`` those named.

    Returns:
        The summary (AP, AP50, AP75, APs, APm, APl as fractions; -1 where undefined) and
        the AP of each class.
    """
    names = list(classes if only is None else only)
    if not results:
        return dict.fromkeys(SUMMARY_KEYS, 0.0), dict.fromkeys(names, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), kind)
        evaluator.params.catIds = [list(classes).index(name) + 1 for name in names]  # ids 1..N
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    summary = {key: float(value) for key, value in zip(SUMMARY_KEYS, evaluator.stats[:6], strict=True)}
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # IoU, recall, class, area=all, maxDets=100
    per_class = {}
    for index, name in enumerate(names):
        values = precision[:, :, index]
        values = values[values > -1]
        per_class[name] = float(values.mean()) if values.size else float("nan")
    return summary, per_class


def evaluate(
    predictor: Predictor,
    annotations_json: str,
    image_dir: str,
    classes: Sequence[str],
    only: Sequence[str] | None = None,
    found_at: float = 0.5,
) -> dict:
    """Predict the split and compute bbox and segm AP (over ``only`` these classes when given).

    Args:
        predictor: The model.
        annotations_json: The split's COCO file.
        image_dir: Its images.
        classes: Class names in model order.
        only: The classes to evaluate (None: all).
        found_at: Count the images with an instance of at least this score (the inference threshold).

    Returns:
        ``{"bbox": {...}, "segm": {...}, "per_class": {kind: {class: AP}}, "found": {"score_threshold",
        "images", "val_images"}}``.
    """
    results = predict_split(predictor, annotations_json, image_dir, classes)
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(annotations_json)
    found = {result["image_id"] for result in results if result["score"] >= found_at}
    report: dict = {"per_class": {}}
    report["found"] = {
        "score_threshold": found_at,
        "images": len(found),
        "val_images": len(ground_truth.imgs),
    }
    for kind in ("bbox", "segm"):
        report[kind], report["per_class"][kind] = coco_ap(ground_truth, results, kind, classes, only)
    logger.info(
        "AP on %s: bbox %.3f, segm %.3f", annotations_json, report["bbox"]["AP"], report["segm"]["AP"]
    )
    return report


def progress_record(
    predictor: Predictor, annotations_json: str, image_dir: str, classes: Sequence[str], iteration: int
) -> dict:
    """Evaluate during training: a ``metrics.jsonl`` record of bbox and segm AP.

    Args:
        predictor: The model as trained so far.
        annotations_json: The val split.
        image_dir: Its images.
        classes: Class names in model order.
        iteration: Iterations done (as in the loss records: 1 after the first).

    Returns:
        ``{"iteration", "bbox_AP", "segm_AP", "bbox_AP50", "segm_AP50"}``.
    """
    report = evaluate(predictor, annotations_json, image_dir, classes)
    return {
        "iteration": iteration,
        **{f"{kind}_{key}": report[kind][key] for kind in ("bbox", "segm") for key in ("AP", "AP50")},
    }


def write_evaluation(reports: dict[str, dict], metrics_path: str, per_class_path: str) -> None:
    """Write ``metrics.json`` (``{model: report}``) and a per-class CSV side by side.

    Args:
        reports: ``{"retrained": report}``, plus ``"baseline"`` when there is one.
        metrics_path: JSON destination.
        per_class_path: CSV destination, one row per model, kind and class.
    """
    write_text_atomic(metrics_path, json.dumps(reports, indent=2) + "\n")
    rows = [
        {"model": model, "kind": kind, "class": name, "AP": value}
        for model, report in reports.items()
        for kind, values in report["per_class"].items()
        for name, value in values.items()
    ]
    write_text_atomic(per_class_path, pd.DataFrame(rows).to_csv(index=False))
