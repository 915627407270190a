"""Predictions back as one COCO dataset file, which pycocotools and labelling tools (CVAT, Label
Studio, ...) import as COCO, so that users correct predictions instead of labelling from scratch."""

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pycocotools import mask as mask_utils

from d2retrain.core.fileio import write_text_atomic
from d2retrain.infer.inputs import InputFile, output_files
from d2retrain.infer.summary import FileStatus

logger = logging.getLogger(__name__)

__all__ = ["predictions_coco", "write_predictions_coco"]


def _image_root(paths: Sequence[str]) -> str:
    """The folder the images' ``file_name`` values are relative to: the deepest folder holding
    them all (relative when every path is and none climbs out with ``..``, so that the file moves
    with the workflow folder; absolute otherwise)."""
    folders = [os.path.normpath(os.path.dirname(path) or ".") for path in paths]
    if any(os.path.isabs(folder) or folder.split(os.sep)[0] == os.pardir for folder in folders):
        folders = [os.path.abspath(folder) for folder in folders]  # names never climb with ..
    return os.path.normpath(os.path.commonpath(folders))


def predictions_coco(
    statuses: Sequence[FileStatus],
    inference_dir: str | Path,
    classes: Sequence[str],
    source_ids: Sequence[int],
) -> dict:
    """The inferred images and their instances as a COCO dataset.

    Images are numbered 1..M in the order of their output names, ``file_name`` relative to
    ``info.image_root``; each instance is an annotation with its RLE mask, box, area and ``score``;
    categories are the model's classes, ids 1..N in model order, each with its dataset id in
    ``source_id``. Videos and files that could not be inferred are left out.

    Args:
        statuses: What inference did to each file (:func:`d2retrain.infer.pipeline.run_inference`).
        inference_dir: The folder holding ``images/<name>.json``.
        classes: The model's class names, in model order.
        source_ids: Their ids in the training data's source file.
    """
    done = sorted((s for s in statuses if s.kind == "image" and s.status == "ok"), key=lambda s: s.name)
    root = _image_root([s.path for s in done]) if done else "."
    category_of = {name: index for index, name in enumerate(classes, start=1)}
    images: list[dict] = []
    annotations: list[dict] = []
    for image_id, status in enumerate(done, start=1):
        predictions = output_files(InputFile(status.path, "image", status.name), str(inference_dir))[1]
        record = json.loads(Path(predictions).read_text())
        path = status.path if not os.path.isabs(root) else os.path.abspath(status.path)
        images.append(
            {
                "id": image_id,
                "file_name": Path(os.path.relpath(path, root)).as_posix(),
                "width": record["width"],
                "height": record["height"],
            }
        )
        for instance in record["instances"]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_of[instance["category_name"]],
                    "segmentation": instance["segmentation"],
                    "area": float(mask_utils.area(instance["segmentation"])),
                    "bbox": instance["bbox"],
                    "score": instance["score"],
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": index, "name": name, "supercategory": "", "source_id": int(source)}
        for index, (name, source) in enumerate(zip(classes, source_ids, strict=True), start=1)
    ]
    info = {"description": "d2retrain predictions", "image_root": root}
    return {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_predictions_coco(
    statuses: Sequence[FileStatus],
    inference_dir: str | Path,
    classes: Sequence[str],
    source_ids: Sequence[int],
    path: str | Path,
) -> dict:
    """Write :func:`predictions_coco` to ``path`` (atomically) and return it."""
    document = predictions_coco(statuses, inference_dir, classes, source_ids)
    write_text_atomic(path, json.dumps(document) + "\n")
    logger.info(
        "%s: %d images, %d predicted instances as COCO (file names relative to %s)",
        path,
        len(document["images"]),
        len(document["annotations"]),
        document["info"]["image_root"],
    )
    return document
