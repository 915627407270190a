"""Per-box mask probabilities pasted into the image as each engine pastes them, with NumPy only.

Exported graphs end at each box's ``M x M`` mask probabilities; pasting into the image happens here,
for the instances kept, exactly as the engine that trained the model does it: bilinear weights are
separable, so each paste is two small matrix products (``rows @ mask @ columns.T``) over the box's
pixels, in float32, without the 1/32-pixel rounding of OpenCV's remap.
"""

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["PASTE_METHODS", "paste_masks"]

PASTE_METHODS = ("torchvision_paste", "detectron2_paste")


def paste_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Paste per-box mask probabilities into images of the image's size.

    Args:
        masks: ``(K, M, M)`` probabilities inside each box.
        boxes: ``(K, 4)`` x0 y0 x1 y1 in image pixels.
        height: Image height.
        width: Image width.
        method: ``torchvision_paste``: torchvision's ``paste_masks_in_image`` (the mask padded by
            one cell, the box grown to match and cut to whole pixels, a bilinear resize with edge
            clamping); ``detectron2_paste``: detectron2's ``paste_masks_in_image`` on a CPU
            (``grid_sample`` at pixel centres, zero outside the mask, over the box's whole pixels
            and one more on each side).

    Returns:
        ``(K, height, width)`` float32 probabilities, zero outside each box.
    """
    paste = _paste_torchvision if method == "torchvision_paste" else _paste_detectron2
    pasted = np.zeros((len(masks), height, width), np.float32)
    for index, (mask, box) in enumerate(zip(masks.astype(np.float32), boxes.astype(np.float32), strict=True)):
        paste(mask, box, pasted[index])
    return pasted


def _paste_torchvision(mask: np.ndarray, box: np.ndarray, image: np.ndarray) -> None:
    size = mask.shape[-1]
    padded = np.pad(mask, 1)
    scale = np.float32((size + 2) / size)
    centre, half = (box[:2] + box[2:]) * np.float32(0.5), (box[2:] - box[:2]) * np.float32(0.5) * scale
    x0, y0, x1, y1 = (int(v) for v in np.concatenate([centre - half, centre + half]).astype(np.int64))
    box_width, box_height = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
    height, width = image.shape
    left, right, top, bottom = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
    if left >= right or top >= bottom:
        return
    rows = _resize_weights(np.arange(top - y0, bottom - y0), box_height, size + 2)
    columns = _resize_weights(np.arange(left - x0, right - x0), box_width, size + 2)
    image[top:bottom, left:right] = rows @ padded @ columns.T


def _resize_weights(outputs: np.ndarray, out_size: int, in_size: int) -> np.ndarray:
    """Bilinear weights of ``F.interpolate(align_corners=False)`` from ``in_size`` cells to
    ``out_size``, for the output positions given: ``(len(outputs), in_size)``."""
    ratio = np.float32(in_size / out_size)
    source = np.maximum((outputs.astype(np.float32) + np.float32(0.5)) * ratio - np.float32(0.5), 0)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    fraction = (source - low).astype(np.float32)
    weights = np.zeros((len(outputs), in_size), np.float32)
    rows = np.arange(len(outputs))
    np.add.at(weights, (rows, low), 1 - fraction)
    np.add.at(weights, (rows, high), fraction)
    return weights


def _paste_detectron2(mask: np.ndarray, box: np.ndarray, image: np.ndarray) -> None:
    height, width = image.shape
    x0, y0, x1, y1 = (float(value) for value in box)
    left, top = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
    right, bottom = min(math.ceil(x1) + 1, width), min(math.ceil(y1) + 1, height)
    if left >= right or top >= bottom:
        return
    rows = _sample_weights(np.arange(top, bottom), box[1], box[3], mask.shape[0])
    columns = _sample_weights(np.arange(left, right), box[0], box[2], mask.shape[1])
    image[top:bottom, left:right] = rows @ mask @ columns.T


def _sample_weights(pixels: np.ndarray, start: np.float32, end: np.float32, cells: int) -> np.ndarray:
    """Bilinear weights of ``grid_sample(align_corners=False, padding_mode="zeros")`` at the
    centres of ``pixels`` over a box from ``start`` to ``end`` split in ``cells``: ``(len, cells)``."""
    grid = (pixels.astype(np.float32) + np.float32(0.5) - start) / (end - start) * np.float32(2) - np.float32(
        1
    )
    source = ((grid + np.float32(1)) * np.float32(cells) - np.float32(1)) / np.float32(2)
    low = np.floor(source).astype(np.int64)
    fraction = (source - low).astype(np.float32)
    # cell c is column c + 1; columns 0 and cells + 1 collect the weights of cells outside the mask
    weights = np.zeros((len(pixels), cells + 2), np.float32)
    rows = np.arange(len(pixels))
    np.add.at(weights, (rows, np.clip(low + 1, 0, cells + 1)), 1 - fraction)
    np.add.at(weights, (rows, np.clip(low + 2, 0, cells + 1)), fraction)
    return weights[:, 1:-1]
