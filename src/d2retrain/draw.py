"""Drawing predictions with OpenCV: masks, outlines, boxes and labels, in about a millisecond."""

import logging
import textwrap
from collections.abc import Sequence

import cv2
import numpy as np

from d2retrain.predictor import Instances

logger = logging.getLogger(__name__)

__all__ = ["PALETTE", "draw_instances", "error_card"]

# matplotlib's tab10, as BGR: one fixed colour per class, the same in every image and frame.
PALETTE = (
    (180, 119, 31),
    (14, 127, 255),
    (44, 160, 44),
    (40, 39, 214),
    (189, 103, 148),
    (75, 86, 140),
    (194, 119, 227),
    (127, 127, 127),
    (34, 189, 188),
    (207, 190, 23),
)


def draw_instances(
    image_bgr: np.ndarray, instances: Instances, names: Sequence[str], alpha: float = 0.45
) -> np.ndarray:
    """Draw each instance's mask (tinted, outlined), box, class name and score on a copy.

    Blending touches only the pixels inside each box, so the cost follows the objects, not the
    image size (detectron2's ``Visualizer`` draws every mask as a polygon through matplotlib).

    Args:
        image_bgr: ``(H, W, 3)`` uint8 image.
        instances: Predictions for that image.
        names: Class names in model order.
        alpha: Mask opacity.

    Returns:
        The drawn image.
    """
    canvas = image_bgr.copy()
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 320))
    font_scale = max(0.35, min(height, width) / 900)
    for index in np.argsort(instances.scores, kind="stable"):  # best drawn last, on top
        color = PALETTE[int(instances.classes[index]) % len(PALETTE)]
        x0, y0, x1, y1 = _box(instances.boxes[index], width, height)
        if x1 > x0 and y1 > y0:
            _tint(canvas, instances.masks[index], (x0, y0, x1, y1), color, alpha, thickness)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, thickness, cv2.LINE_AA)
        label = f"{names[int(instances.classes[index])]} {instances.scores[index]:.0%}"
        _label(canvas, label, (x0, y0), color, font_scale)
    return canvas


def _box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    return max(0, x0), max(0, y0), min(width, x1), min(height, y1)


def _tint(
    canvas: np.ndarray,
    mask: np.ndarray,
    box: tuple[int, int, int, int],
    color: tuple[int, int, int],
    alpha: float,
    thickness: int,
) -> None:
    x0, y0, x1, y1 = box
    region = mask[y0:y1, x0:x1]
    if not region.any():
        return
    patch = canvas[y0:y1, x0:x1]
    tinted = patch[region].astype(np.float32) * (1 - alpha) + np.float32(alpha) * np.array(color, np.float32)
    patch[region] = tinted.astype(np.uint8)
    contours, _ = cv2.findContours(
        region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0)
    )
    cv2.drawContours(canvas, contours, -1, color, thickness, cv2.LINE_AA)


def _label(canvas: np.ndarray, text: str, corner: tuple[int, int], color: tuple, scale: float) -> None:
    (text_width, text_height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = corner
    y = max(y, text_height + baseline)  # keep the label inside the image
    cv2.rectangle(canvas, (x, y - text_height - baseline), (x + text_width, y), color, cv2.FILLED)
    ink = (0, 0, 0) if sum(color) > 400 else (255, 255, 255)
    cv2.putText(canvas, text, (x, y - baseline), cv2.FONT_HERSHEY_SIMPLEX, scale, ink, 1, cv2.LINE_AA)


def error_card(title: str, message: str, width: int = 640, height: int = 360) -> np.ndarray:
    """A dark picture that says, in words, that a file was not inferred and why.

    Args:
        title: First line (e.g. the file name).
        message: What was wrong.
        width: Picture width (even, for video).
        height: Picture height (even, for video).

    Returns:
        The ``(height, width, 3)`` uint8 picture.
    """
    card = np.full((height, width, 3), 32, np.uint8)
    lines = ["NOT INFERRED", title, *textwrap.wrap(message, width=max(20, width // 11))]
    for number, line in enumerate(lines[: height // 28]):
        color = (80, 80, 255) if number == 0 else (230, 230, 230)
        cv2.putText(card, line, (16, 36 + 28 * number), cv2.FONT_HERSHEY_SIMPLEX, 0.6, color, 1, cv2.LINE_AA)
    return card
