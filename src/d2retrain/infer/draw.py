"""Drawing predictions with OpenCV: masks, outlines, boxes and labels, in about a millisecond."""

import logging
import textwrap
from collections.abc import Sequence

import cv2
import numpy as np

from d2retrain.model.instances import Instances

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
    image_bgr: np.ndarray,
    instances: Instances,
    names: Sequence[str],
    alpha: float = 0.45,
    colors: Sequence[tuple[int, int, int]] | None = None,
    labels: Sequence[str] | None = None,
    trails: Sequence[tuple[tuple[int, int, int], Sequence[tuple[float, float]]]] = (),
) -> np.ndarray:
    """Draw each instance's mask (tinted, outlined), box, class name and score on a copy.

    Masks are painted into one overlay, blended once; per instance only the pixels of its box
    are touched, so the cost follows the objects (detectron2's ``Visualizer`` draws every mask
    as polygons through matplotlib, tens of milliseconds a frame).

    Args:
        image_bgr: ``(H, W, 3)`` uint8 image.
        instances: Predictions for that image.
        names: Class names in model order.
        alpha: Mask opacity.
        colors: One BGR colour per instance (a track's); by default its class's.
        labels: One label per instance; by default its class name and score.
        trails: Polylines drawn under the instances, each ``(colour, points)`` (tracks' paths).

    Returns:
        The drawn image.
    """
    canvas = image_bgr.copy()
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 320))
    for color, points in trails:
        if len(points) > 1:
            path = np.round(np.asarray(points)).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(canvas, [path], False, color, thickness + 1, cv2.LINE_AA)
    if not len(instances):
        return canvas
    order = np.argsort(instances.scores, kind="stable")  # best drawn last, on top
    boxes = [_box(instances.boxes[i], width, height) for i in order]
    if colors is None:
        colors = [PALETTE[int(instances.classes[i]) % len(PALETTE)] for i in range(len(instances))]
    if labels is None:
        labels = [
            f"{names[int(label)]} {score:.0%}"
            for label, score in zip(instances.classes, instances.scores, strict=True)
        ]
    colors = [colors[i] for i in order]
    # which instance (1-based, in drawing order) each pixel shows; blended once, in the union box
    owner = np.zeros((height, width), np.uint8 if len(order) < 255 else np.uint16)
    regions = []
    for number, (index, (x0, y0, x1, y1)) in enumerate(zip(order, boxes, strict=True), start=1):
        region = instances.masks[index][y0:y1, x0:x1]
        np.copyto(owner[y0:y1, x0:x1], number, where=region, casting="unsafe")
        regions.append(region)
    ux0, uy0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    ux1, uy1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    owned = owner[uy0:uy1, ux0:ux1]
    lookup = np.zeros((256, 1, 3), np.uint8)
    lookup[1 : len(colors) + 1, 0] = colors[:255]
    patch = canvas[uy0:uy1, ux0:ux1]
    painted = cv2.LUT(cv2.merge([np.minimum(owned, 255).astype(np.uint8)] * 3), lookup)
    blended = cv2.addWeighted(patch, 1 - alpha, painted, alpha, 0)
    cv2.copyTo(blended, (owned > 0).view(np.uint8), patch)  # in place: patch is a view of canvas
    font_scale = max(0.35, min(height, width) / 900)
    for index, box, color, region in zip(order, boxes, colors, regions, strict=True):
        if region.size:
            contours, _ = cv2.findContours(
                np.ascontiguousarray(region).view(np.uint8),
                cv2.RETR_EXTERNAL,
                cv2.CHAIN_APPROX_SIMPLE,
                offset=box[:2],
            )
            cv2.drawContours(canvas, contours, -1, color, thickness, cv2.LINE_AA)
        cv2.rectangle(canvas, box[:2], box[2:], color, thickness, cv2.LINE_AA)
        _label(canvas, labels[index], box[:2], color, font_scale)
    return canvas


def _box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    x0, y0 = min(max(0, x0), width), min(max(0, y0), height)
    return x0, y0, max(x0, min(width, x1)), max(y0, min(height, y1))


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
