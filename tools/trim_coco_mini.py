"""Cut a COCO-MINI copy down to the test assets: whole images with their annotations, chosen so that
the tests' conditions hold, within a size budget.

Usage: .venv/bin/python tools/trim_coco_mini.py SOURCE DEST [--budget-mb 15.5] [--unlisted 4]

SOURCE holds ``annotations/instances_{train,val}2017.json`` and ``{train,val}2017/`` as COCO-MINI
ships them. For each split the kept images are, in this order:

1. every image with a ``sports ball`` or a crowd (RLE) annotation;
2. images that bring a category closer to two images (so that a split of the file can put each such
   category on both sides), the one adding most per byte first;
3. the smallest remaining files while the split's share of the budget allows;

an image is only added while the file still splits into train and val with every category of two
images or more on both sides (``d2retrain.data.split``, at the fractions and seeds the tests use:
two images of a category must go to different sides, and such pairs must not close an odd cycle);

each JSON keeps ``info``, ``licenses`` and all 80 ``categories`` (ids 1..90) and the kept images'
records and annotations unchanged, in the source's order. ``val2017/`` also gets the ``--unlisted``
smallest JPEGs that its JSON does not name. Files are copied byte for byte. Same source, same cut.
"""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from d2retrain.core.errors import D2RetrainError
from d2retrain.data.split import split_file

SPLITS = ("train", "val")
SPLIT_TRIES = [(0.2, 0), (0.2, 1), (0.25, 0), (0.3, 0), (0.3, 1), (0.3, 4)]  # (val fraction, seed)


def _splittable(document: dict, ids: set[int]) -> bool:
    kept = dict(document, images=[i for i in document["images"] if i["id"] in ids])
    kept["annotations"] = [a for a in document["annotations"] if a["image_id"] in ids]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "in.json"
        path.write_text(json.dumps(kept))
        try:
            for fraction, seed in SPLIT_TRIES:
                split_file(str(path), f"{folder}/t.json", f"{folder}/v.json", fraction, seed)
        except D2RetrainError:
            return False
    return True


def _kept_images(document: dict, folder: Path, budget: int) -> list[dict]:
    names = {c["id"]: c["name"] for c in document["categories"]}
    size = {image["id"]: (folder / image["file_name"]).stat().st_size for image in document["images"]}
    categories: dict[int, set[int]] = {image["id"]: set() for image in document["images"]}
    required = set()
    for annotation in document["annotations"]:
        categories[annotation["image_id"]].add(annotation["category_id"])
        if annotation["iscrowd"] or names[annotation["category_id"]] == "sports ball":
            required.add(annotation["image_id"])
    kept = set(required)
    refused: set[int] = set()
    seen = {category: sum(category in categories[i] for i in kept) for category in names}

    def gain(image: int) -> float:
        return sum(seen[c] < 2 for c in categories[image]) / size[image]

    while True:
        spent = sum(size[i] for i in kept)
        candidates = [i for i in sorted(categories) if i not in kept | refused and spent + size[i] <= budget]
        best = max(candidates, key=lambda i: (gain(i), -size[i]), default=None)
        if best is None or gain(best) == 0:
            break
        if not _splittable(document, kept | {best}):
            refused.add(best)
            continue
        kept.add(best)
        for category in categories[best]:
            seen[category] += 1
    for image in sorted(categories, key=lambda i: (size[i], i)):
        if image in kept or sum(size[i] for i in kept) + size[image] > budget:
            continue
        if _splittable(document, kept | {image}):
            kept.add(image)
    return [image for image in document["images"] if image["id"] in kept]


def trim(source: Path, destination: Path, budget_mb: float, unlisted: int) -> None:
    """Writes the trimmed copy of ``source`` into ``destination`` (see the module's docstring)."""
    shares = {"train": 0.47, "val": 0.5}  # the rest: the unlisted val files
    for split in SPLITS:
        document = json.loads((source / "annotations" / f"instances_{split}2017.json").read_text())
        folder = source / f"{split}2017"
        named = {image["file_name"] for image in document["images"]}
        images = _kept_images(document, folder, int(shares[split] * budget_mb * 1e6))
        ids = {image["id"] for image in images}
        document["images"] = images
        document["annotations"] = [a for a in document["annotations"] if a["image_id"] in ids]
        (destination / "annotations").mkdir(parents=True, exist_ok=True)
        (destination / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(document))
        (destination / f"{split}2017").mkdir(exist_ok=True)
        unlisted_files = sorted(
            (path for path in folder.glob("*.jpg") if path.name not in named),
            key=lambda path: (path.stat().st_size, path.name),
        )[:unlisted]
        for path in [folder / image["file_name"] for image in images] + unlisted_files:
            shutil.copyfile(path, destination / f"{split}2017" / path.name)
        print(split, len(images), "images", len(document["annotations"]), "annotations")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the COCO-MINI folder to cut from")
    parser.add_argument("destination", type=Path, help="the folder to write (emptied first)")
    parser.add_argument("--budget-mb", type=float, default=15.5, help="megabytes of JPEG files in all")
    parser.add_argument("--unlisted", type=int, default=4, help="val JPEGs kept that the JSON does not name")
    arguments = parser.parse_args()
    if arguments.destination.exists():
        shutil.rmtree(arguments.destination)
    trim(arguments.source, arguments.destination, arguments.budget_mb, arguments.unlisted)
    total = sum(p.stat().st_size for p in arguments.destination.rglob("*") if p.is_file())
    print(f"{total / 1e6:.1f} MB in {arguments.destination}{os.sep}")


if __name__ == "__main__":
    main()
