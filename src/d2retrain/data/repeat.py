"""Repeat-factor balancing (LVIS, detectron2's ``RepeatFactorTrainingSampler``): rare categories'
images are seen more often, none is dropped.

A category c found on a fraction f(c) of the training file's images gets r(c) = max(1, sqrt(t / f(c)));
an image takes the largest r of its categories (1 without annotations). Both engines read the same
numbers from the file :func:`write_repeat_factors` writes beside the training JSON.
"""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from d2retrain.core.errors import D2RetrainError
from d2retrain.core.fileio import write_text_atomic
from d2retrain.data.coco import CocoDocument, read_coco

logger = logging.getLogger(__name__)

__all__ = ["repeat_factors", "write_repeat_factors", "read_repeat_factors", "expected_counts"]


def repeat_factors(document: CocoDocument, threshold: float) -> dict[int, float]:
    """Each image's repeat factor by image id, as detectron2's
    ``repeat_factors_from_category_frequency`` computes it over the same images (every image of
    the file; an image's categories are those of all its annotations, crowd ones included)."""
    table = document.table
    pairs = np.unique(np.stack([table.image_ids, table.category_ids]), axis=1)
    images = max(1, len(document.images))
    categories, counts = np.unique(pairs[1], return_counts=True)
    category_factor = {
        int(c): max(1.0, math.sqrt(threshold / (n / images))) for c, n in zip(categories, counts, strict=True)
    }
    factors = dict.fromkeys(document.image_ids.tolist(), 1.0)
    for image_id, category_id in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
        factors[image_id] = max(factors[image_id], category_factor[category_id])
    return factors


def write_repeat_factors(annotations_json: str, output_json: str, threshold: float) -> None:
    """Write ``{"threshold", "image_ids", "factors"}`` for a training file and log, per category,
    the instances an epoch is expected to show before and after repeating."""
    document = read_coco(annotations_json)
    factors = repeat_factors(document, threshold)
    record = {"threshold": threshold, "image_ids": list(factors), "factors": list(factors.values())}
    write_text_atomic(output_json, json.dumps(record) + "\n")
    expected = expected_counts(document, factors)
    logger.info(
        "repeat factors of %s (threshold %g): %d images, %.1f per epoch on average; per category:\n%s",
        annotations_json,
        threshold,
        len(factors),
        sum(factors.values()),
        expected.to_string(index=False),
    )


def read_repeat_factors(path: str | Path) -> dict[int, float]:
    """The factors :func:`write_repeat_factors` wrote, by image id.

    Raises:
        D2RetrainError: Not such a file.
    """
    try:
        record = json.loads(Path(path).read_text())
        return dict(zip(record["image_ids"], record["factors"], strict=True))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise D2RetrainError(f"{path}: not a repeat-factor file ({error})") from None


def expected_counts(document: CocoDocument, factors: dict[int, float]) -> pd.DataFrame:
    """Per category: instances and images in the file, and expected per epoch with ``factors``
    (each image counted its factor times)."""
    table = document.table
    weight = np.array([factors.get(int(i), 1.0) for i in table.image_ids.tolist()])
    rows = []
    for category in document.categories:
        chosen = table.category_ids == category.id
        images = np.unique(table.image_ids[chosen])
        rows.append(
            {
                "category": category.name,
                "instances": int(chosen.sum()),
                "images": len(images),
                "expected_instances": float(weight[chosen].sum()),
                "expected_images": float(sum(factors.get(int(i), 1.0) for i in images.tolist())),
            }
        )
    return pd.DataFrame(rows)
