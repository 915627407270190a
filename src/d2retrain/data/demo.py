"""Deterministic demo dataset: COCO-format images of people, balls and cars, plus a tracking video.

The video shows four people walking past each other, a ball thrown across them and a ball rolling
behind a wall; beside it, its ground truth in MOTChallenge form holds the box and visible fraction
of each person and ball (not the wall) in each frame where it is visible enough.
"""

import dataclasses
import datetime
import logging
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import msgspec
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from d2retrain.core.fileio import atomic_open, write_bytes_atomic, write_text_atomic
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
_WALL = 0  # the video's occluder: a plain block, of no category (a car's wheels look like balls)
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


def _background(
    rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT, levels: tuple[int, int] = (40, 200)
) -> np.ndarray:
    corners = rng.uniform(*levels, size=(2, 2, 3)).astype(np.float32)
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


@dataclasses.dataclass(frozen=True)
class _Mover:
    """One object of the demo video, moving a constant step per frame.

    In units of the 256 x 192 drawing canvas: its place at frame 0 (person: centre and top; ball:
    centre; wall: left and top), its size (person: height; ball: radius; wall: width), its step.
    """

    category: int
    x: float
    y: float
    size: float
    step: tuple[float, float] = (0.0, 0.0)

    def polygons(self, index: int, unit: float) -> list[np.ndarray]:
        """The object's polygons in pixels at frame ``index`` (from 0)."""
        x, y = (self.x + self.step[0] * index) * unit, (self.y + self.step[1] * index) * unit
        if self.category == _PERSON:
            return _person(x, y, self.size * unit)
        if self.category == _WALL:
            width, height = self.size * unit, self.size * unit * 0.5
            return [np.array([[x, y], [x + width, y], [x + width, y + height], [x, y + height]])]
        return [_circle(x, y, self.size * unit)]


# The video's objects in drawing order (back to front), laid out for 60 frames: two people
# walking past each other in the upper band and two in the lower one (the one behind is hidden
# for a few frames), a ball rolling behind a wall in the middle band (the wall is not ground
# truth), a ball thrown across all of them.
_VIDEO_SCENE = (
    _Mover(_PERSON, 18, 4, 66, (3.4, 0.0)),
    _Mover(_PERSON, 236, 8, 62, (-2.6, 0.0)),
    _Mover(_PERSON, 40, 124, 64, (1.6, 0.0)),
    _Mover(_PERSON, 236, 120, 66, (-3.0, 0.0)),
    _Mover(_BALL, 8, 99, 11, (4.4, 0.0)),
    _Mover(_WALL, 88, 80, 84),
    _Mover(_BALL, 248, 18, 12, (-3.3, 2.5)),
)
_MIN_VISIBILITY = 0.3  # an object less visible than this is left out of its frame's ground truth


def _ground_truth(frame: int, scene: list[tuple[int, list[np.ndarray]]], width: int, height: int) -> str:
    """MOT ground-truth lines of one frame: the box and fraction of each object's visible pixels."""
    pad = max(width, height)  # the full masks of objects past the border
    labels = np.zeros((height + 2 * pad, width + 2 * pad), dtype=np.uint8)
    scratch, areas = np.zeros_like(labels), []
    for number, (_, polygons) in enumerate(scene, start=1):
        scratch[:] = 0
        cv2.fillPoly(scratch, [np.round(p).astype(np.int32) + pad for p in polygons], 1)
        areas.append(int(scratch.sum()))
        labels[scratch == 1] = number
    inside = labels[pad : pad + height, pad : pad + width]
    lines: list[str] = []
    track = 0
    for number, ((category, _), area) in enumerate(zip(scene, areas, strict=True), start=1):
        if category == _WALL:
            continue
        track += 1
        rows, columns = np.nonzero(inside == number)
        if area == 0 or rows.size < _MIN_VISIBILITY * area:  # gone past the padding, or hidden
            continue
        left, top = columns.min(), rows.min()
        box = ",".join(f"{v:.2f}" for v in (left, top, columns.max() + 1 - left, rows.max() + 1 - top))
        lines.append(f"{frame},{track},{box},1,{category},{rows.size / area:.2f}\n")
    return "".join(lines)


def _contrasting_seeds(rng: np.random.Generator, background: np.ndarray, count: int) -> list[int]:
    """Seeds whose :func:`_paint` colours stand out from the background's mean colour and from
    each other (objects the detector cannot see, or sees as one, would measure the detector, not
    the tracker)."""
    mean = background.reshape(-1, 3).mean(axis=0)
    seeds: list[int] = []
    colors: list[np.ndarray] = []
    while len(seeds) < count:
        seed = int(rng.integers(2**32))
        color = np.random.default_rng(seed).integers(0, 256, size=3)
        if np.linalg.norm(color - mean) >= 150 and all(np.linalg.norm(color - c) >= 110 for c in colors):
            seeds.append(seed)
            colors.append(color)
    return seeds


def _video_frames(rng: np.random.Generator, frames: int) -> Iterator[tuple[np.ndarray, str]]:
    """Yield each frame of the demo video (BGR) with its ground-truth lines."""
    width, height = VIDEO_SIZE
    unit = min(width, height) / HEIGHT
    # a muted background (its corners' levels within 90..150), so that every object's colour can
    # stand out from all of it (:func:`_contrasting_seeds`), not only from its mean
    background = _background(rng, width, height, levels=(90, 150))
    color_seeds = _contrasting_seeds(rng, background, len(_VIDEO_SCENE))  # an object keeps its colour
    for index in range(frames):
        image = background.copy()
        scene = [(mover.category, mover.polygons(index, unit)) for mover in _VIDEO_SCENE]
        for (category, polygons), color_seed in zip(scene, color_seeds, strict=True):
            if category == _WALL:  # a shade off the background: hides what passes behind, looks like nothing
                shade = tuple(int(v) for v in np.clip(background.reshape(-1, 3).mean(axis=0) + 18, 0, 255))
                cv2.fillPoly(image, [np.round(p).astype(np.int32) for p in polygons], shade)
            else:
                _paint(np.random.default_rng(color_seed), image, category, polygons)
        yield image, _ground_truth(index + 1, scene, width, height)


def _write_video(path: Path, rng: np.random.Generator, frames: int, fps: int = 10) -> str:
    """Write the demo video; return its ground truth (MOT lines)."""
    lines: list[str] = []
    with atomic_open(path) as handle, av.open(handle, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        # x264's output depends on its thread count (by default, the machine's cores): a fixed count
        # makes the same video, whose ground truth and scores the tests check, on every machine
        stream.options = {"crf": "20", "threads": "2"}
        for picture, truth in _video_frames(rng, frames):
            lines.append(truth)
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return "".join(lines)


def write_demo_dataset(
    root: str | Path, seed: int = 0, train: int = 80, val: int = 24, video_frames: int = 60, test: int = 0
) -> DemoLayout:
    """Write the demo dataset under ``root`` (see :class:`DemoLayout`): images of the
    :data:`IMAGE_SIZES` in turn, a video of :data:`VIDEO_SIZE` and its ground-truth tracks.

    The video (10 fps) shows four people walking past each other, a ball thrown across them and
    a ball rolling behind a wall, each moving a constant step per frame (laid out for 60
    frames; fewer show its start, more show it emptying). Its ground truth
    (:attr:`DemoLayout.video_ground_truth`) has a MOTChallenge line per person and ball per frame,
    ``frame,id,bb_left,bb_top,bb_width,bb_height,1,class,visibility``: frames and ids from 1, the
    COCO category id as class, the box of the object's visible pixels (0-based pixel edges, as
    COCO boxes) and the visible fraction of its whole mask; an object less than 30% visible is
    left out of that frame, and the wall is left out.

    Args:
        root: Destination folder.
        seed: Random seed; the same seed gives the same annotations and pixels.
        train: Number of training images.
        val: Number of validation images.
        video_frames: Frames of the demo video.
        test: Number of test images (0: no test split), from their own random stream, so that
            train and val are the same with or without them.

    Returns:
        The layout of what was written.
    """
    layout = DemoLayout(Path(root))
    rng = np.random.default_rng(seed)
    _write_split(layout, "train", train, rng, first_id=1)
    _write_split(layout, "val", val, rng, first_id=10_000)
    if test:
        _write_split(layout, "test", test, np.random.default_rng((seed, 2)), first_id=20_000)
    # the video's own stream of the seed: the same video whatever the image counts
    video = _write_video(layout.video, np.random.default_rng((seed, 1)), video_frames)
    write_text_atomic(layout.video_ground_truth, video)
    logger.info(
        "demo dataset: %d train, %d val and %d test images and a %d-frame video in %s",
        train,
        val,
        test,
        video_frames,
        root,
    )
    return layout
