"""train.augment: colour jitter, random crop and large-scale jitter in both engines keep the image,
the masks and the boxes aligned, on real photos whose annotated pixels are painted red."""

import json

import cv2
import numpy as np
import pytest
import torch
import yaml
from helpers import COCO_MINI, filled
from helpers.training import D2_SMALL, TINY, mini_inputs

from d2retrain.core.errors import D2RetrainError
from d2retrain.data.masks import rasterize
from d2retrain.data.records import load_records
from d2retrain.model.folder import ModelFolder
from d2retrain.model.specs import solver_spec
from d2retrain.train.augment import TorchvisionAugment, jitter_size
from d2retrain.train.run import train_from_config
from d2retrain.train.samples import TrainSamples

SIZES = {"min_size_train": [160, 192], "max_size_train": 320}
GEOMETRIC = {
    "flip": ({}, True),
    "crop": ({"crop": 0.5}, False),
    "scale_jitter": ({"scale_jitter": [0.3, 1.5]}, False),
    "crop, jitter and flip": ({"crop": 0.6, "scale_jitter": [0.5, 1.5], "brightness": 0.2}, True),
}
COLOUR = {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5}
RED_BGR = (0, 0, 255)


@pytest.fixture(scope="module")
def painted(tmp_path_factory):
    """Six coco-mini photos (PNG) whose instances' pixels are pure red, and their COCO file."""
    folder = tmp_path_factory.mktemp("painted")
    document = json.loads((COCO_MINI / "annotations/instances_val2017.json").read_text())
    by_image: dict[int, list] = {}
    for annotation in document["annotations"]:
        if not annotation.get("iscrowd") and isinstance(annotation["segmentation"], list):
            by_image.setdefault(annotation["image_id"], []).append(annotation)
    images = [image for image in document["images"] if 2 <= len(by_image.get(image["id"], [])) <= 8][:6]
    for image in images:
        photo = cv2.imread(str(COCO_MINI / "val2017" / image["file_name"]))
        for annotation in by_image[image["id"]]:
            photo[rasterize(annotation["segmentation"], image["height"], image["width"]) > 0] = RED_BGR
        image["file_name"] = image["file_name"].replace(".jpg", ".png")
        cv2.imwrite(str(folder / image["file_name"]), photo)
    document["images"] = images
    document["annotations"] = [a for image in images for a in by_image[image["id"]]]
    (folder / "painted.json").write_text(json.dumps(document))
    return folder


def check_aligned(image_rgb: np.ndarray, masks: np.ndarray, boxes: np.ndarray, box_tolerance: float) -> None:
    """Red pixels are the instances' pixels (the masks), and each box is its mask's extent."""
    assert image_rgb.shape[:2] == masks.shape[1:], (image_rgb.shape, masks.shape)
    assert len(masks) == len(boxes)
    red = (image_rgb[..., 0] > 200) & (image_rgb[..., 1] < 60) & (image_rgb[..., 2] < 60)
    union = masks.any(0).astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)  # resizing blends the 1-px border: judged inside and outside it
    inner, outer = cv2.erode(union, kernel).astype(bool), cv2.dilate(union, kernel).astype(bool)
    if inner.sum() >= 50:
        assert (red & inner).sum() / inner.sum() > 0.9  # the masks lie on the red pixels
        assert (red & ~outer).sum() / red.sum() < 0.1  # and the red pixels under the masks
    for mask, box in zip(masks, boxes, strict=True):
        rows, columns = np.nonzero(mask)
        assert len(rows), "an instance without pixels is dropped"
        extent = [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]
        np.testing.assert_allclose(box, extent, atol=box_tolerance)


def torchvision_samples(folder, augment: dict, flip: bool) -> TrainSamples:
    solver = solver_spec(filled("train", SIZES | {"augment": augment}))
    records = load_records(str(folder / "painted.json"), str(folder))
    return TrainSamples(records, seed=3, flip=flip, augment=TorchvisionAugment(solver))


def torchvision_sample(samples: TrainSamples, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image, target = samples[position]
    rgb = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return rgb, target["masks"].numpy().astype(bool), target["boxes"].numpy()


@pytest.mark.parametrize("case", GEOMETRIC)
def test_torchvision_augmentations_keep_image_masks_and_boxes_aligned(painted, case):
    augment, flip = GEOMETRIC[case]
    plain = torchvision_samples(painted, {}, flip=False)
    samples = torchvision_samples(painted, augment, flip)
    sizes = set()
    for position in range(12):
        image, masks, boxes = torchvision_sample(samples, position)
        # COCO's boxes are drawn apart from the polygons (a few px off the raster); crops recompute them
        check_aligned(image, masks, boxes, box_tolerance=0.01 if "crop" in case or "jitter" in case else 4)
        again = torchvision_sample(samples, position)  # a resumed run reads the same sample
        assert all(np.array_equal(a, b) for a, b in zip((image, masks, boxes), again, strict=True))
        sizes.add((image.shape[:2], torchvision_sample(plain, position)[0].shape[:2]))
    if "jitter" in case:
        side = jitter_size(solver_spec(filled("train", SIZES)))
        assert {size for size, _ in sizes} == {(side, side)}  # LSJ: squares the model keeps
    elif "crop" in case:
        assert all(size[0] <= full[0] and size[1] <= full[1] for size, full in sizes)
        assert any(size != full for size, full in sizes)


def test_torchvision_colour_jitter_changes_pixels_only(painted):
    plain = torchvision_samples(painted, {}, flip=False)
    for key, amount in COLOUR.items():
        samples = torchvision_samples(painted, {key: amount}, flip=False)
        changed = 0
        for position in range(6):
            image, masks, boxes = torchvision_sample(samples, position)
            reference, reference_masks, reference_boxes = torchvision_sample(plain, position)
            assert image.shape == reference.shape
            assert np.array_equal(masks, reference_masks) and np.array_equal(boxes, reference_boxes)
            changed += not np.array_equal(image, reference)
        assert changed >= 5, key


def detectron2_sample(folder, augment: dict, flip: bool, seed: int):
    """One augmented sample through detectron2's DatasetMapper, as the detectron2 engine builds it."""
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json
    from detectron2.structures import BitMasks

    from d2retrain.train.augment import detectron2_augmentations

    solver = solver_spec(filled("train", SIZES | {"flip": flip, "augment": augment}))
    augmentations, recompute = detectron2_augmentations(solver)
    mapper = DatasetMapper(
        is_train=True,
        augmentations=augmentations,
        image_format="BGR",
        use_instance_mask=True,
        recompute_boxes=recompute,
    )
    dicts = load_coco_json(str(folder / "painted.json"), str(folder))
    np.random.seed(seed)
    mapped = mapper(dicts[seed % len(dicts)])
    image = mapped["image"].permute(1, 2, 0).numpy()[..., ::-1]  # BGR -> RGB
    instances = mapped["instances"]
    height, width = image.shape[:2]
    masks = BitMasks.from_polygon_masks(instances.gt_masks, height, width).tensor.numpy()
    return image, masks, instances.gt_boxes.tensor.numpy(), recompute


@pytest.mark.detectron2
@pytest.mark.parametrize("case", GEOMETRIC)
def test_detectron2_augmentations_keep_image_masks_and_boxes_aligned(painted, case):
    augment, flip = GEOMETRIC[case]
    for seed in range(12):
        image, masks, boxes, recompute = detectron2_sample(painted, augment, flip, seed)
        assert recompute == ("crop" in case or "jitter" in case)
        keep = masks.any((1, 2))  # detectron2 keeps an instance by its (polygon) box
        # boxes are polygon extents (given, or recomputed after a crop): a few px off the raster
        check_aligned(image, masks[keep], boxes[keep], box_tolerance=4)
        if "jitter" in case:
            side = jitter_size(solver_spec(filled("train", SIZES)))
            assert image.shape[:2] == (side, side)


@pytest.mark.detectron2
def test_detectron2_colour_jitter_changes_pixels_only(painted):
    for key, amount in COLOUR.items():
        for seed in range(3):
            image, masks, boxes, _ = detectron2_sample(painted, {key: amount}, False, seed)
            reference, reference_masks, reference_boxes, _ = detectron2_sample(painted, {}, False, seed)
            assert image.shape == reference.shape and not np.array_equal(image, reference), key
            assert np.array_equal(masks, reference_masks) and np.allclose(boxes, reference_boxes)


@pytest.mark.parametrize(
    ("augment", "words"),
    [({"crop": 0}, "crop"), ({"scale_jitter": [0.5]}, "scale_jitter"), ({"hue": 0.1}, "hue")],
)
def test_bad_augment_keys_are_refused(augment, words, tmp_path):
    from d2retrain.core.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"train": {"augment": augment}}))
    with pytest.raises(D2RetrainError, match=words):
        load_config(path)


AUGMENT_ALL = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "crop": 0.7, "scale_jitter": [0.5, 1.5]}


@pytest.mark.parametrize("engine", ["torchvision", pytest.param("detectron2", marks=pytest.mark.detectron2)])
def test_a_training_with_every_augmentation_records_it_in_the_model_folder(
    engine,
    mini_split,
    tmp_path,
):
    """Each engine trains with all of train.augment on; the folder's config.yaml gives it back (the
    fingerprint holds it: another augmentation does not resume these checkpoints)."""
    model = {"architecture": "maskrcnn_resnet18_fpn"} if engine == "torchvision" else D2_SMALL
    train = TINY | {"iterations": 2, "steps": [], "augment": AUGMENT_ALL}
    inputs = mini_inputs(mini_split[1], tmp_path / "model")
    train_from_config(model=model, train=train, **inputs)
    solver = solver_spec(ModelFolder(tmp_path / "model").read_config()["solver"])
    assert solver.augment == solver_spec(filled("train", train)).augment
    assert solver.augment.scale_jitter == (0.5, 1.5)
