"""One size function for every engine and its exports; copies of a split at other sizes."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import COCO_MINI
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from d2retrain.data.rescale import other_sizes, write_rescaled_split
from d2retrain.model.resize import padded_size, predict_in_groups, resized_size

# Sizes that resize awkwardly: odd, prime, portrait, landscape, under and over the cap, the
# 478x640 photo whose traced resize came out at another width.
SIZES = [(478, 640), (640, 478), (427, 640), (333, 500), (191, 256), (257, 1000), (1001, 97), (2, 3)]
TESTS = [(192, 360), (800, 1333), (160, 200)]


@pytest.mark.parametrize(("shortest_edge", "max_size"), TESTS)
def test_the_torchvision_rule_is_the_size_torchvisions_transform_resizes_to(shortest_edge, max_size):
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transform = GeneralizedRCNNTransform(shortest_edge, max_size, [0, 0, 0], [1, 1, 1]).eval()
    for height, width in SIZES:
        resized, _ = transform.resize(torch.zeros(3, height, width))
        assert tuple(resized.shape[-2:]) == resized_size(
            height, width, shortest_edge, max_size, "torchvision"
        )


@pytest.mark.detectron2
@pytest.mark.parametrize(("shortest_edge", "max_size"), TESTS)
def test_the_detectron2_rule_is_resize_shortest_edges_output_shape(shortest_edge, max_size):
    from detectron2.data.transforms import ResizeShortestEdge

    for height, width in SIZES:
        expected = ResizeShortestEdge.get_output_shape(height, width, shortest_edge, max_size)
        assert resized_size(height, width, shortest_edge, max_size, "detectron2") == expected


def test_the_rules_differ_where_they_round_differently_and_an_unknown_rule_is_refused():
    assert resized_size(427, 640, 192, 360, "torchvision") == (192, 287)
    assert resized_size(427, 640, 192, 360, "detectron2") == (192, 288)
    with pytest.raises(ValueError, match="unknown resize rule"):
        resized_size(10, 10, 5, 5, "pillow")


def test_padded_sizes_group_the_images_and_results_come_back_in_order():
    assert padded_size((190, 287), 32) == (192, 288) == padded_size((192, 288), 32)
    assert padded_size((190, 287), 0) == (190, 287)
    calls = []

    def predict(items: list[str]) -> list[str]:
        calls.append(items)
        return [item.upper() for item in items]

    items = ["a", "b", "c", "d", "e"]
    assert predict_in_groups(items, [1, 2, 1, 3, 2], predict) == ["A", "B", "C", "D", "E"]
    assert calls == [["a", "c"], ["b", "e"], ["d"]]


def test_a_split_rescaled_to_other_sizes_keeps_its_masks_on_the_pixels(tmp_path):
    source = COCO_MINI / "annotations" / "instances_val2017.json"
    document = json.loads(source.read_text())
    crowd_image = next(a["image_id"] for a in document["annotations"] if a["iscrowd"])
    kept = [i for i in document["images"] if i["id"] == crowd_image] + document["images"][:3]
    ids = {image["id"] for image in kept}
    small = tmp_path / "val.json"
    small.write_text(
        json.dumps(
            document
            | {"images": kept, "annotations": [a for a in document["annotations"] if a["image_id"] in ids]}
        )
    )
    sizes = other_sizes(192, 360)
    assert all(w % 32 and h % 32 for w, h in sizes) and any(h > w for w, h in sizes)
    assert any(w > 360 for w, h in sizes) and any(min(w, h) < 192 for w, h in sizes)
    annotations, images = write_rescaled_split(
        str(small), str(COCO_MINI / "val2017"), tmp_path / "copy", sizes
    )
    copy = COCO(annotations)  # pycocotools reads it
    original = COCO(str(small))
    for index, image in enumerate(kept):
        new = copy.imgs[image["id"]]
        assert (new["width"], new["height"]) == sizes[index % len(sizes)]
        assert (Path(images) / new["file_name"]).is_file()
        scale = new["width"] * new["height"] / (image["width"] * image["height"])
        for before, after in zip(
            original.loadAnns(original.getAnnIds(image["id"])),
            copy.loadAnns(copy.getAnnIds(image["id"])),
            strict=True,
        ):
            assert after["iscrowd"] == before["iscrowd"]
            assert after["area"] == pytest.approx(before["area"] * scale, rel=0.25, abs=30)
            mask = copy.annToMask(after)
            assert mask.shape == (new["height"], new["width"])
            x, y, w, h = after["bbox"]
            ys, xs = np.nonzero(mask)
            if len(xs):  # the mask lies in its box
                assert (
                    xs.min() >= x - 2
                    and xs.max() <= x + w + 2
                    and ys.min() >= y - 2
                    and ys.max() <= y + h + 2
                )
    assert any(isinstance(a["segmentation"], dict) for a in copy.dataset["annotations"])
    assert mask_utils.area(copy.annToRLE(copy.dataset["annotations"][0])) > 0
