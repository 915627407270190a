"""Image copies and mask PNGs."""

import os

import cv2
import numpy as np
import pytest
from helpers import make_coco, square, write_json
from pycocotools import mask as mask_utils

from d2retrain.core.errors import AnnotationError, InputFileError, UnsafePathError
from d2retrain.data.masks import CROWD_INSTANCE, IGNORE, copy_images_and_masks, rasterize, render_masks


def test_semantic_and_instance_masks_follow_the_annotations(tmp_path):
    document = make_coco([[1, 2]], categories=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    document["annotations"][0]["segmentation"] = square(0, 0, 10)
    document["annotations"][1]["segmentation"] = square(20, 20, 10)
    crowd = np.zeros((64, 64), dtype=np.uint8, order="F")
    crowd[40:50, 0:30] = 1
    crowd[5:8, 5:8] = 1  # overlaps instance 1: the instance wins
    rle = mask_utils.encode(crowd)
    document["annotations"].append(
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 1,
            "area": 1.0,
            "segmentation": {"counts": rle["counts"].decode(), "size": [64, 64]},
        }
    )
    render_masks(str(write_json(tmp_path / "a.json", document)), str(tmp_path / "m"))
    semantic = cv2.imread(str(tmp_path / "m" / "img_1_semantic.png"), cv2.IMREAD_UNCHANGED)
    instances = cv2.imread(str(tmp_path / "m" / "img_1_instances.png"), cv2.IMREAD_UNCHANGED)
    assert semantic.dtype == np.uint8 and instances.dtype == np.uint16
    assert (
        semantic[5, 5] == 1 and semantic[25, 25] == 2 and semantic[45, 10] == IGNORE and semantic[60, 60] == 0
    )
    assert instances[5, 5] == 1 and instances[25, 25] == 2 and instances[45, 10] == CROWD_INSTANCE
    expected = rasterize(square(20, 20, 10), 64, 64)
    assert np.array_equal(semantic == 2, expected)


def test_degenerate_polygons_are_dropped_and_counted(tmp_path):
    document = make_coco([[1, 1]])
    document["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]
    assert render_masks(str(write_json(tmp_path / "a.json", document)), str(tmp_path / "m")) == 1


def test_images_are_linked_and_a_missing_one_is_named(tmp_path):
    (tmp_path / "imgs").mkdir()
    document = make_coco([[1], [1]])
    for image in document["images"][:1]:
        cv2.imwrite(str(tmp_path / "imgs" / image["file_name"]), np.zeros((64, 64, 3), np.uint8))
    annotations = write_json(tmp_path / "a.json", document)
    with pytest.raises(InputFileError, match=r"1 image.*img_2\.jpg"):
        copy_images_and_masks(
            str(annotations), str(tmp_path / "imgs"), str(tmp_path / "o"), str(tmp_path / "m")
        )
    cv2.imwrite(str(tmp_path / "imgs" / "img_2.jpg"), np.zeros((64, 64, 3), np.uint8))
    copy_images_and_masks(
        str(annotations), str(tmp_path / "imgs"), str(tmp_path / "o"), str(tmp_path / "m"), 2
    )
    assert os.path.samefile(tmp_path / "o" / "img_2.jpg", tmp_path / "imgs" / "img_2.jpg")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "img_1_instances.png",
        "img_1_semantic.png",
        "img_2_instances.png",
        "img_2_semantic.png",
    ]


def test_a_symlink_pointing_out_of_the_image_folder_is_refused(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (tmp_path / "imgs" / "img_1.jpg").symlink_to(tmp_path / "secret.jpg")
    annotations = write_json(tmp_path / "a.json", make_coco([[1]]))
    with pytest.raises(UnsafePathError, match="link pointing out"):
        copy_images_and_masks(
            str(annotations), str(tmp_path / "imgs"), str(tmp_path / "o"), str(tmp_path / "m")
        )


def test_rle_of_the_wrong_size_is_refused():
    with pytest.raises(AnnotationError, match="RLE of size"):
        rasterize({"counts": [0, 4], "size": [2, 3]}, 2, 2)
