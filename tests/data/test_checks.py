"""The data speaks up: overlapping splits, thin balancing, repeat factors of 1, rare classes, blind models."""

import json
import shutil

import pytest
from helpers import CATEGORIES, COCO_MINI, make_coco, write_json

from d2retrain.data.checks import balance_warnings, overlap_warnings, rare_class_warnings, repeat_warnings
from d2retrain.data.coco import read_coco
from d2retrain.data.filtering import FilterOptions, balance_document, filter_document
from d2retrain.data.stats import write_data_checks


def coco_mini(split: str):
    return read_coco(COCO_MINI / "annotations" / f"instances_{split}2017.json")


def test_val_images_that_are_training_images_are_found_by_name_and_size_or_by_bytes(tmp_path):
    train = coco_mini("train")
    assert (
        overlap_warnings(train, str(COCO_MINI / "train2017"), coco_mini("val"), str(COCO_MINI / "val2017"))
        == []
    )
    document = json.loads((COCO_MINI / "annotations" / "instances_train2017.json").read_text())
    folder = tmp_path / "val"
    folder.mkdir()
    for index, image in enumerate(document["images"][:3]):
        name = image["file_name"] if index < 2 else "renamed.jpg"  # the third: same bytes, another name
        shutil.copy(COCO_MINI / "train2017" / image["file_name"], folder / name)
        image["file_name"] = name
    ids = {image["id"] for image in document["images"][:3]}
    document["images"] = document["images"][:3]
    document["annotations"] = [a for a in document["annotations"] if a["image_id"] in ids]
    val = read_coco(write_json(tmp_path / "val.json", document))
    (warning,) = overlap_warnings(train, str(COCO_MINI / "train2017"), val, str(folder))
    assert warning.startswith("3 of the 3 val images are also training images (") and "renamed.jpg" in warning


def test_balancing_that_keeps_under_a_quarter_of_the_images_names_the_numbers_and_repeat(tmp_path):
    many = [[1]] * 9 + [[1, 37]] * 2 + [[37]]  # 12 images, 2 with both
    filtered = filter_document(
        read_coco(write_json(tmp_path / "a.json", make_coco(many))),
        ["person", "sports ball"],
        FilterOptions(),
    )
    (warning,) = balance_warnings(filtered, balance_document(filtered, "all"))
    assert "keeps 2 of the 12 training images (17%)" in warning and "balance: repeat" in warning
    even = filter_document(
        read_coco(write_json(tmp_path / "b.json", make_coco([[1, 37], [1]]))),
        ["person", "sports ball"],
        FilterOptions(),
    )
    assert balance_warnings(even, balance_document(even, "all")) == []


def test_repeat_factors_of_one_name_the_threshold_that_would_repeat_the_rarest_class(tmp_path):
    document = read_coco(write_json(tmp_path / "a.json", make_coco([[1], [1], [1, 37], [1, 3], [1, 3]])))
    (warning,) = repeat_warnings(document, {i: 1.0 for i in range(1, 6)}, 0.1)
    assert "the rarest, sports ball, on 20.0%" in warning and "repeat_threshold 0.201 or more" in warning
    assert repeat_warnings(document, {1: 1.0, 2: 1.4}, 0.1) == []


def test_a_class_with_few_training_instances_is_named(tmp_path):
    document = read_coco(write_json(tmp_path / "a.json", make_coco([[1] * 12, [37] * 3])))
    assert {w.split(" has ")[0] for w in rare_class_warnings(document)} == {"sports ball", "car"}  # 3 and 0


def test_the_stats_job_writes_the_warnings_for_the_report_and_says_when_there_are_none(tmp_path, caplog):
    two = [category for category in CATEGORIES if category["id"] in (1, 37)]
    train = write_json(tmp_path / "train.json", make_coco([[1, 37]] * 12, two))
    val = write_json(tmp_path / "val.json", make_coco([[1, 37]] * 3, two))  # the same file names, same sizes
    steps = {"train": {"filtered": str(train), "balanced": str(train)}, "val": {"filtered": str(val)}}
    warnings = write_data_checks(
        steps, {"train": str(tmp_path), "val": str(tmp_path)}, str(tmp_path / "c.html"), "s"
    )
    assert len(warnings) == 1 and "3 of the 3 val images are also training images" in warnings[0]
    assert "also training images" in (tmp_path / "c.html").read_text() and "data: 3 of the 3" in caplog.text
    distinct = make_coco([[1, 37]] * 3, two)
    for image in distinct["images"]:
        image["file_name"] = f"val_{image['file_name']}"
    other = write_json(tmp_path / "other.json", distinct)
    steps["val"] = {"filtered": str(other)}
    assert (
        write_data_checks(
            steps, {"train": str(tmp_path), "val": str(tmp_path)}, str(tmp_path / "d.html"), "s"
        )
        == []
    )
    assert "No warnings" in (tmp_path / "d.html").read_text()


@pytest.mark.parametrize(("images", "warned"), [(0, True), (1, False)])
def test_a_model_that_finds_nothing_on_any_val_image_is_named_with_what_to_try(images, warned):
    from d2retrain.model.engines import _found_nothing

    report = {"found": {"score_threshold": 0.5, "images": images, "val_images": 24}, "segm": {"AP": 0.0}}
    warnings = _found_nothing(report)
    assert bool(warnings) == warned
    if warned:
        assert "finds nothing at score >= 0.5 on any of the 24 val images (segm AP 0.000)" in warnings[0]
        assert "inference.score_threshold" in warnings[0]
