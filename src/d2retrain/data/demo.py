"""Deterministic demo dataset: COCO-format images of people, balls and cars, plus a video."""

import dataclasses
import datetime
import logging
from fractions import Fraction
from pathlib import Path

import av
import cv2
import msgspec
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from d2retrain.core.fileio import atomic_open, write_bytes_atomic
from d2retrain.data.layout import DemoLayout

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_CATEGORIES",
    "IMAGE_SIZES",
    "VIDEO_SIZE",
    "DemoLayout",
    "Instance",
    "render_scene",
    "write_demo_dataset",
]

DEMO_CATEGORIES = (
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "sports", "id": 37, "name": "sports ball"},
)
_PERSON, _CAR, _BALL = 1, 3, 37
WIDTH, HEIGHT = 256, 192  # the size the objects are drawn for; other sizes scale them
# (width, height) of the images, in turn: landscape and portrait, sides that are not multiples of
# 32, some above the test size (192) and its cap (360), so that inference, evaluation and exports
# meet resizing, padding and batches of mixed sizes.
IMAGE_SIZES = ((256, 192), (192, 256), (301, 227), (227, 301), (416, 312), (283, 211), (211, 283), (365, 203))
VIDEO_SIZE = (286, 214)  # even sides (H.264 4:2:0), not multiples of 32


@dataclasses.dataclass(frozen=True)
class Instance:
    """One drawn object: its category, polygons (COCO flat lists) or crowd mask."""

    category_id: int
    polygons: list[list[float]]
    crowd_mask: np.ndarray | None = None


def _circle(cx: float, cy: float, radius: float, points: int = 20) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)


def _person(cx: float, top: float, height: float) -> list[np.ndarray]:
    width = height * 0.38
    head = height * 0.16
    body_top = top + 2 * head
    leg = height - 2 * head
    body = np.array(
        [
            (-0.5, 0.0),
            (0.5, 0.0),
            (0.42, 0.5),
            (0.3, 1.0),
            (0.08, 1.0),
            (0.0, 0.55),
            (-0.08, 1.0),
            (-0.3, 1.0),
            (-0.42, 0.5),
        ]
    ) * [width, leg] + [cx, body_top]
    return [_circle(cx, top + head, head, 12), body]


def _car(left: float, top: float, width: float) -> list[np.ndarray]:
    height = width * 0.45
    outline = np.array(
        [
            (0.0, 0.45),
            (0.22, 0.42),
            (0.32, 0.0),
            (0.72, 0.0),
            (0.84, 0.42),
            (1.0, 0.5),
            (1.0, 1.0),
            (0.0, 1.0),
        ]
    )
    return [outline * [width, height] + [left, top]]


def _bounds(polygons: list[np.ndarray]) -> tuple[float, float, float, float]:
    points = np.concatenate(polygons)
    return (*points.min(axis=0), *points.max(axis=0))


def _overlaps(box: tuple[float, ...], boxes: list[tuple[float, ...]], margin: float = 4) -> bool:
    return any(
        box[0] < other[2] + margin
        and other[0] < box[2] + margin
        and box[1] < other[3] + margin
        and other[1] < box[3] + margin
        for other in boxes
    )


def _propose(rng: np.random.Generator, category: int, width: int, height: int) -> list[np.ndarray]:
    unit = min(width, height) / HEIGHT  # objects keep their size relative to the image
    if category == _PERSON:
        tall = rng.uniform(55, 120) * unit
        return _person(rng.uniform(15, width - 15), rng.uniform(2, height - tall - 2), tall)
    if category == _CAR:
        long = rng.uniform(60, 110) * unit
        return _car(rng.uniform(2, width - long - 2), rng.uniform(2, height - long * 0.45 - 2), long)
    radius = rng.uniform(10, 24) * unit
    return [
        _circle(
            rng.uniform(radius + 2, width - radius - 2), rng.uniform(radius + 2, height - radius - 2), radius
        )
    ]


def _background(rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    corners = rng.uniform(40, 200, size=(2, 2, 3)).astype(np.float32)
    image = cv2.resize(corners, (width, height), interpolation=cv2.INTER_LINEAR)
    image += np.asarray(rng.normal(0, 6, size=image.shape), dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _paint(rng: np.random.Generator, image: np.ndarray, category: int, polygons: list[np.ndarray]) -> None:
    if category == _BALL:
        color = (250, 250, 250) if rng.random() < 0.5 else (30, 140, 250)
        (cx, cy), radius = polygons[0].mean(axis=0), np.ptp(polygons[0][:, 0]) / 2
        cv2.fillPoly(image, [np.round(polygons[0]).astype(np.int32)], color)
        cv2.circle(image, (int(cx), int(cy)), max(2, int(radius * 0.35)), (20, 20, 20), -1)
        return
    red, green, blue = (int(c) for c in rng.integers(0, 256, size=3))
    color = (red, green, blue)
    cv2.fillPoly(image, [np.round(p).astype(np.int32) for p in polygons], color)
    if category == _CAR:
        left, top, right, bottom = _bounds(polygons)
        radius = int((bottom - top) * 0.2)
        for x in (left + (right - left) * 0.22, left + (right - left) * 0.78):
            cv2.circle(image, (int(x), int(bottom - radius - 1)), radius, (25, 25, 25), -1)


def _crowd(rng: np.random.Generator, image: np.ndarray, boxes: list) -> Instance:
    height, width = image.shape[:2]
    unit = min(width, height) / HEIGHT
    left, top = rng.uniform(2, width - 92 * unit), rng.uniform(2, height - 30 * unit)
    mask = np.zeros((height, width), dtype=np.uint8)
    for column in range(9):
        polygons = _person(
            left + (5 + column * 10 + rng.uniform(-1, 1)) * unit,
            top + rng.uniform(0, 4) * unit,
            rng.uniform(20, 24) * unit,
        )
        points = [np.round(p).astype(np.int32) for p in polygons]
        cv2.fillPoly(image, points, tuple(int(c) for c in rng.integers(0, 256, size=3)))
        cv2.fillPoly(mask, points, 1)
    boxes.append((left, top, left + 92 * unit, top + 30 * unit))
    return Instance(_PERSON, [], crowd_mask=mask.astype(bool))


def render_scene(
    rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT
) -> tuple[np.ndarray, list[Instance]]:
    """Draw one demo image and return it with its instances.

    The mix is uneven on purpose: people are the most common, some images hold only
    people or only balls, some hold cars, and about one in six has a crowd of small people.

    Args:
        rng: Source of randomness (the dataset is deterministic for a given seed).
        width: The image's width.
        height: Its height (objects scale with the shorter side).

    Returns:
        A BGR ``(height, width, 3)`` image and the instances drawn on it.
    """
    image = _background(rng, width, height)
    kind = rng.choice(["both", "people", "balls", "cars"], p=[0.4, 0.25, 0.15, 0.2])
    wanted = {
        "both": [_PERSON] * rng.integers(1, 4) + [_BALL] * rng.integers(1, 3),
        "people": [_PERSON] * rng.integers(1, 4),
        "balls": [_BALL] * rng.integers(1, 4),
        "cars": [_CAR] * rng.integers(1, 3) + [_PERSON] * rng.integers(0, 2),
    }[str(kind)]
    boxes: list = []
    instances = [_crowd(rng, image, boxes)] if rng.random() < 1 / 6 else []
    for category in wanted:
        for _ in range(30):
            polygons = _propose(rng, category, width, height)
            box = _bounds(polygons)
            if not _overlaps(box, boxes):
                boxes.append(box)
                _paint(rng, image, category, polygons)
                instances.append(Instance(category, [np.round(p, 2).ravel().tolist() for p in polygons]))
                break
    return image, instances


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"counts": counts, "size": list(mask.shape)}


def _annotation(instance: Instance, annotation_id: int, image_id: int, height: int, width: int) -> dict:
    segmentation: dict | list[list[float]]
    if instance.crowd_mask is not None:
        segmentation = _uncompressed_rle(instance.crowd_mask)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        segmentation = instance.polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(instance.polygons, height, width))
    return {
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "iscrowd": int(instance.crowd_mask is not None),
        "image_id": image_id,
        "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
        "category_id": instance.category_id,
        "id": annotation_id,
    }


def _write_split(layout: DemoLayout, split: str, count: int, rng: np.random.Generator, first_id: int) -> None:
    images: list[dict] = []
    annotations: list[dict] = []
    names = layout.image_names(split, count)
    for number, file_name in enumerate(tqdm(names, desc=f"demo {split}", unit="img", disable=None)):
        image_id = first_id + number
        width, height = IMAGE_SIZES[number % len(IMAGE_SIZES)]
        picture, instances = render_scene(rng, width, height)
        ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 92])
        assert ok
        write_bytes_atomic(layout.images(split) / file_name, encoded.tobytes())
        images.append(
            {"license": 1, "file_name": file_name, "height": height, "width": width, "id": image_id}
        )
        for instance in instances:
            annotation_id = len(annotations) + first_id * 100 + 1
            annotations.append(_annotation(instance, annotation_id, image_id, height, width))
    document = {
        "info": {
            "description": "d2retrain demo dataset (synthetic)",
            "version": "1.0",
            "year": 2026,
            "date_created": datetime.date(2026, 1, 1).isoformat(),
        },
        "licenses": [
            {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
        ],
        "images": images,
        "annotations": annotations,
        "categories": list(DEMO_CATEGORIES),
    }
    write_bytes_atomic(layout.annotations(split), msgspec.json.encode(document))


def _video_frames(rng: np.random.Generator, frames: int):
    width, height = VIDEO_SIZE
    unit = min(width, height) / HEIGHT
    background = _background(rng, width, height)
    for index in range(frames):
        image = background.copy()
        phase = index / max(1, frames - 1)
        _paint(rng, image, _PERSON, _person(20 * unit + phase * (width - 40 * unit), 40 * unit, 110 * unit))
        bounce = abs(np.sin(phase * 3 * np.pi))
        ball = [
            _circle(
                width - 30 * unit - phase * (width - 60 * unit),
                height - (20 + bounce * 100) * unit,
                16 * unit,
            )
        ]
        _paint(np.random.default_rng(7), image, _BALL, ball)
        yield image


def _write_video(path: Path, rng: np.random.Generator, frames: int, fps: int = 10) -> None:
    with atomic_open(path) as handle, av.open(handle, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "20"}
        for picture in _video_frames(rng, frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_demo_dataset(
    root: str | Path, seed: int = 0, train: int = 80, val: int = 24, video_frames: int = 40
) -> DemoLayout:
    """Write the demo dataset under ``root`` (see :class:`DemoLayout`): images of the
    :data:`IMAGE_SIZES` in turn, a video of :data:`VIDEO_SIZE`.

    Args:
        root: Destination folder.
        seed: Random seed; the same seed gives the same annotations and pixels.
        train: Number of training images.
        val: Number of validation images.
        video_frames: Frames of the demo video (10 fps).

    Returns:
        The layout of what was written.
    """
    layout = DemoLayout(Path(root))
    rng = np.random.default_rng(seed)
    _write_split(layout, "train", train, rng, first_id=1)
    _write_split(layout, "val", val, rng, first_id=10_000)
    _write_video(layout.video, rng, video_frames)
    logger.info(
        "demo dataset: %d train and %d val images and a %d-frame video in %s", train, val, video_frames, root
    )
    return layout
