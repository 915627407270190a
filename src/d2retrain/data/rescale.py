"""Copies of a COCO split at other image sizes, annotations rescaled alike (for checks at every size)."""

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from d2retrain.core.fileio import write_bytes_atomic, write_text_atomic
from d2retrain.data.images import read_image
from d2retrain.data.masks import resolve_image_path

logger = logging.getLogger(__name__)

__all__ = ["other_sizes", "rescale_annotation", "write_rescaled_split"]


def other_sizes(shortest_edge: int, max_size: int) -> list[tuple[int, int]]:
    """(width, height) pairs that exercise a test-time resize: a portrait, a landscape, one under
    the test size, one wider than the cap; odd sides, none a multiple of 32.

    Args:
        shortest_edge: The test size of the shorter side.
        max_size: The cap on the longer side.
    """
    factors = [
        (shortest_edge * 1.37, shortest_edge * 2.05),  # portrait
        (shortest_edge * 2.21, shortest_edge * 1.49),  # landscape
        (shortest_edge * 0.83, shortest_edge * 0.61),  # under the test size
        (max_size * 2.3, shortest_edge * 1.1),  # wider than the cap
    ]
    return [(int(width) | 1, int(height) | 1) for width, height in factors]  # odd: never a multiple of 32


def rescale_annotation(annotation: dict, scale_x: float, scale_y: float, height: int, width: int) -> dict:
    """An annotation of an image resized by (``scale_x``, ``scale_y``) to ``height`` x ``width``:
    polygons and box scaled, an RLE mask resized (nearest), the area measured again.

    Args:
        annotation: A COCO annotation (polygons, or an RLE with ``size``).
        scale_x: New width over old.
        scale_y: New height over old.
        height: The new image's height.
        width: The new image's width.

    Returns:
        A new annotation; the input is not changed.
    """
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        polygons = [
            np.round(np.asarray(p, float).reshape(-1, 2) * [scale_x, scale_y], 2).ravel().tolist()
            for p in segmentation
        ]
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        new_segmentation: list | dict = polygons
    else:
        old = segmentation
        if isinstance(old["counts"], list):
            old = mask_utils.frPyObjects(old, *old["size"])
        mask = cv2.resize(mask_utils.decode(old), (width, height), interpolation=cv2.INTER_NEAREST)
        rle = mask_utils.encode(np.asfortranarray(mask))
        new_segmentation = {"size": [height, width], "counts": rle["counts"].decode()}
    x, y, w, h = annotation["bbox"]
    bbox = [x * scale_x, y * scale_y, w * scale_x, h * scale_y]
    return annotation | {"segmentation": new_segmentation, "bbox": bbox, "area": float(mask_utils.area(rle))}


def write_rescaled_split(
    annotations_json: str, image_dir: str, output_dir: str | Path, sizes: Sequence[tuple[int, int]]
) -> tuple[str, str]:
    """Write a copy of a split whose images are resized, image ``k`` to ``sizes[k % len(sizes)]``
    (bilinear, PNG), with their annotations rescaled alike (:func:`rescale_annotation`).

    Args:
        annotations_json: The split's COCO file.
        image_dir: Its images.
        output_dir: Where ``annotations.json`` and ``images/`` are written.
        sizes: (width, height) pairs to cycle through.

    Returns:
        The new COCO file and image folder.
    """
    document = json.loads(Path(annotations_json).read_text())
    output = Path(output_dir)
    scales: dict[int, tuple[float, float, int, int]] = {}
    images = []
    for index, image in enumerate(document["images"]):
        width, height = sizes[index % len(sizes)]
        picture = read_image(resolve_image_path(image_dir, image["file_name"]))
        resized = cv2.resize(picture, (width, height), interpolation=cv2.INTER_LINEAR)
        name = f"{index:06d}_{Path(image['file_name']).stem}_{width}x{height}.png"  # unique
        ok, encoded = cv2.imencode(".png", resized)
        assert ok, "PNG encoding of a uint8 BGR image cannot fail"
        write_bytes_atomic(output / "images" / name, encoded.tobytes())
        scales[image["id"]] = (width / picture.shape[1], height / picture.shape[0], height, width)
        images.append(image | {"file_name": name, "width": width, "height": height})
    annotations = [rescale_annotation(a, *scales[a["image_id"]]) for a in document["annotations"]]
    path = output / "annotations.json"
    write_text_atomic(path, json.dumps(document | {"images": images, "annotations": annotations}))
    logger.info("%d images rescaled to %s in %s", len(images), sizes, output)
    return str(path), str(output / "images")
