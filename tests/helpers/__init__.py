"""What the tests share beside fixtures: paths to the real data in ``tests/assets``, small COCO
factories, a demo model trained on the CPU, photos of mixed sizes. Imported as ``helpers``
(``pythonpath`` in pyproject.toml); the fixtures are in ``tests/conftest.py``."""

import copy
import functools
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from d2retrain.data.layout import DemoLayout

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"
COCO_MINI = ASSETS / "coco-mini"
VIDEO = ASSETS / "video" / "one-by-one-person-detection.mp4"
DEMO_DATASET = {
    split: {
        "images": f"resources/demo/{split}",
        "annotations": f"resources/demo/annotations/instances_{split}.json",
    }
    for split in ("train", "val")
}
"""The demo data's splits as a ``datasets`` entry of a workflow config."""


@functools.cache
def detectron2_importable() -> bool:
    """Whether detectron2 can be imported here (its tests skip otherwise)."""
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


def filled(section: str, values: dict | None = None) -> dict:
    """A config section with the schema's defaults filled in as the CLI and the Snakefile fill them
    (``with_defaults``): what the spec builders take."""
    from d2retrain.core.config import with_defaults

    return with_defaults({section: values or {}})[section]


TWO_CPUS = hasattr(os, "fork") and len(os.sched_getaffinity(0)) >= 2


CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "sports", "id": 37, "name": "sports ball"},
]


def square(x: float, y: float, size: float) -> list[list[float]]:
    """A square polygon in COCO's flat format."""
    return [[x, y, x + size, y, x + size, y + size, x, y + size]]


def make_coco(images: list[list[int]], categories: list[dict] | None = None) -> dict:
    """A COCO document: ``images[i]`` lists the category ids of image i+1's annotations.

    Annotation k (1-based, in order) is a square of side 10 + k at (k, k) with area
    (10 + k)^2, and carries an extra field so tests can check it survives.
    """
    document = {
        "info": {"description": "factory", "year": 2026},
        "licenses": [{"id": 1, "name": "test"}],
        "images": [],
        "annotations": [],
        "categories": copy.deepcopy(categories or CATEGORIES),
    }
    for number, category_ids in enumerate(images, start=1):
        document["images"].append(
            {
                "id": number,
                "file_name": f"img_{number}.jpg",
                "height": 64,
                "width": 64,
                "flickr_url": f"u{number}",
            }
        )
        for category_id in category_ids:
            k = len(document["annotations"]) + 1
            document["annotations"].append(
                {
                    "id": k,
                    "image_id": number,
                    "category_id": category_id,
                    "segmentation": square(k % 20, k % 20, 10 + k % 20),
                    "area": float((10 + k % 20) ** 2),
                    "bbox": [k % 20, k % 20, 10 + k % 20, 10 + k % 20],
                    "iscrowd": 0,
                    "note": {"source": "factory", "k": k},
                }
            )
    return document


def write_json(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))
    return path


def train_demo_model(
    root: Path, sizes: dict, train: dict, classes: list[str], model: dict | None = None
) -> tuple[Path, "DemoLayout", dict]:
    """Write a demo dataset (``sizes``: train, val, video_frames) under ``root``, filter it to
    ``classes`` and train a model on it with the ``train`` settings on the CPU (``model``: the
    demo network unless given).

    Returns:
        The model folder, the dataset's layout and the filtered files (``{"train", "val"}``).
    """
    from d2retrain.data.demo import write_demo_dataset
    from d2retrain.data.filtering import FilterOptions
    from d2retrain.data.prepare import filter_file
    from d2retrain.train.run import train_from_config

    layout = write_demo_dataset(root / "demo", **sizes)
    files = {}
    for split in ("train", "val"):
        files[split] = str(root / f"{split}.json")
        filter_file(str(layout.annotations(split)), files[split], classes, FilterOptions())
    train_from_config(
        model=model or {"engine": "torchvision", "architecture": "maskrcnn_resnet18_fpn"},
        train={"device": "cpu", **train},
        classes=classes,
        train_json=files["train"],
        train_images=str(layout.images("train")),
        val_json=files["val"],
        val_images=str(layout.images("val")),
        source_json=str(layout.annotations("train")),
        output_dir=str(root / "model"),
        threads=2,
    )
    return root / "model", layout, files


def mixed_photos(folder: Path) -> list[Path]:
    """Real photos of several sizes and orientations: coco-mini val photos (portrait and landscape)
    and copies at odd sizes, one far wider than the test size's cap."""
    folder.mkdir(parents=True, exist_ok=True)
    document = json.loads((COCO_MINI / "annotations" / "instances_val2017.json").read_text())
    portrait = [i["file_name"] for i in document["images"] if i["height"] > i["width"]][:2]
    landscape = [i["file_name"] for i in document["images"] if i["height"] < i["width"]][:3]
    photos = [shutil.copy(COCO_MINI / "val2017" / name, folder / name) for name in portrait + landscape]
    import cv2

    source = cv2.imread(str(COCO_MINI / "val2017" / landscape[0]))
    for width, height in ((317, 229), (229, 317), (1000, 300)):
        path = folder / f"copy_{width}x{height}.png"
        cv2.imwrite(str(path), cv2.resize(source, (width, height), interpolation=cv2.INTER_AREA))
        photos.append(path)
    sizes = {cv2.imread(str(path)).shape[:2] for path in photos}
    assert len(sizes) >= 5 and any(h > w for h, w in sizes) and any(h < w for h, w in sizes)
    return [Path(path) for path in photos]
