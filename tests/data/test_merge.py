"""Datasets merged with name aliases: coco-mini's train photos beside a second dataset whose ids
collide with them and whose `sports ball` is called `ball`."""

import json
import os
import shutil

import pandas as pd
import pytest
import yaml
from helpers import COCO_MINI, REPO, write_json
from helpers.workflow import planned_jobs, snakemake

from d2retrain.cli import main
from d2retrain.core.errors import D2RetrainError
from d2retrain.data.coco import read_coco
from d2retrain.data.filtering import FilterOptions, count_categories
from d2retrain.data.merge import MergeSource, merge_files
from d2retrain.data.prepare import filter_file
from d2retrain.data.records import load_records

COCO_TRAIN = COCO_MINI / "annotations" / "instances_train2017.json"


@pytest.fixture
def rig(tmp_path):
    """coco-mini's val file as another team labelled it: `ball` for `sports ball`, image and
    annotation ids starting at 1 (coco-mini's train ids reused)."""
    document = json.loads((COCO_MINI / "annotations" / "instances_val2017.json").read_text())
    train = json.loads(COCO_TRAIN.read_text())
    image_ids = {
        image["id"]: new["id"] for image, new in zip(document["images"], train["images"], strict=False)
    }
    document["images"] = [
        dict(image, id=image_ids[image["id"]]) for image in document["images"] if image["id"] in image_ids
    ]
    document["annotations"] = [
        dict(a, id=number, image_id=image_ids[a["image_id"]])
        for number, a in enumerate(document["annotations"], start=train["annotations"][0]["id"])
        if a["image_id"] in image_ids
    ]
    for category in document["categories"]:
        if category["name"] == "sports ball":
            category["name"] = "ball"
    return write_json(tmp_path / "rig.json", document)


def merge_arguments(tmp_path, rig, *extra: str) -> list[str]:
    return [
        "merge",
        "--dataset", "coco", str(COCO_TRAIN), str(COCO_MINI / "train2017"),
        "--dataset", "rig", str(rig), str(COCO_MINI / "val2017"),
        "--alias", "rig", "ball=sports ball",
        "-o", str(tmp_path / "merged.json"),
        *extra,
    ]  # fmt: skip


def test_merged_ids_are_unique_categories_meet_by_name_and_every_record_is_traceable(tmp_path, rig):
    assert main(merge_arguments(tmp_path, rig, "--images-out", str(tmp_path / "images"))) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    originals = {"coco": json.loads(COCO_TRAIN.read_text()), "rig": json.loads(rig.read_text())}
    assert any(  # the two datasets' ids collide: the merge has to renumber
        image["id"] in {i["id"] for i in originals["coco"]["images"]} for image in originals["rig"]["images"]
    )
    assert [image["id"] for image in merged["images"]] == list(range(1, len(merged["images"]) + 1))
    assert [a["id"] for a in merged["annotations"]] == list(range(1, len(merged["annotations"]) + 1))
    names = [category["name"] for category in merged["categories"]]
    assert len(names) == len(set(names)) == 80 and "ball" not in names  # one category per name
    for name, original in originals.items():
        assert sum(image["source"]["dataset"] == name for image in merged["images"]) == len(
            original["images"]
        )
    images = {(name, image["id"]): image for name, doc in originals.items() for image in doc["images"]}
    new_ids = {}
    for image in merged["images"]:
        source = image["source"]
        original = images[(source["dataset"], source["id"])]
        assert (
            image["file_name"] == f"{source['dataset']}/{original['file_name']}"
            and source["file_name"] == original["file_name"]
        )
        assert {k: v for k, v in image.items() if k not in ("id", "file_name", "source")} == {
            k: v for k, v in original.items() if k not in ("id", "file_name")
        }
        new_ids[(source["dataset"], source["id"])] = image["id"]
        folder = COCO_MINI / ("train2017" if source["dataset"] == "coco" else "val2017")
        assert os.path.samefile(tmp_path / "images" / image["file_name"], folder / original["file_name"])
    category_name = {c["id"]: c["name"] for c in merged["categories"]}
    annotations = {(name, a["id"]): (a, doc) for name, doc in originals.items() for a in doc["annotations"]}
    for annotation in merged["annotations"]:
        original, document = annotations[(annotation["source"]["dataset"], annotation["source"]["id"])]
        assert annotation["image_id"] == new_ids[(annotation["source"]["dataset"], original["image_id"])]
        (name,) = [c["name"] for c in document["categories"] if c["id"] == original["category_id"]]
        assert category_name[annotation["category_id"]] == {"ball": "sports ball"}.get(name, name)
        assert (
            annotation["segmentation"] == original["segmentation"] and annotation["bbox"] == original["bbox"]
        )

    # the merged file filters and trains like any other: counts add up, images are found
    filter_file(
        str(tmp_path / "merged.json"), str(tmp_path / "pb.json"), ["person", "sports ball"], FilterOptions()
    )
    counts = {row.category: row.instances for row in count_categories(read_coco(tmp_path / "pb.json"))}
    separate = [
        {row.category: row.instances for row in count_categories(read_coco(path), names)}
        for path, names in ((COCO_TRAIN, ["person", "sports ball"]), (rig, ["person", "ball"]))
    ]
    assert counts == {
        "person": separate[0]["person"] + separate[1]["person"],
        "sports ball": separate[0]["sports ball"] + separate[1]["ball"],
    }
    assert len(load_records(str(tmp_path / "pb.json"), str(tmp_path / "images"))) > 0


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            ["--alias", "rig", "football=sports ball"],
            "aliases of dataset rig name no category of it: football",
        ),
        (["--alias", "rig", "person=sports ball"], "several of its categories are named sports ball"),
        (["--alias", "other", "ball=sports ball"], "--alias names no --dataset: other"),
        (["--alias", "rig", "ball"], "expected DATASET NAME=NEW_NAME"),
        (["--dataset", "again", str(COCO_TRAIN), str(COCO_MINI / "train2017")], "both name the image file"),
    ],
)
def test_merge_refuses_unknown_aliases_name_clashes_and_shared_image_files(
    tmp_path, rig, capsys, change, words
):
    assert main(merge_arguments(tmp_path, rig, *change)) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "merged.json").exists()


@pytest.fixture
def rig_folder(tmp_path):
    """A second dataset as a user brings it: one annotation file (to split), its own folder of
    photos (copies of coco-mini val photos, 3 with a `ball`), its own ids and names."""
    document = json.loads((COCO_MINI / "annotations" / "instances_val2017.json").read_text())
    ball = next(c["id"] for c in document["categories"] if c["name"] == "sports ball")
    with_ball = {a["image_id"] for a in document["annotations"] if a["category_id"] == ball}
    others = [i["id"] for i in document["images"] if i["id"] not in with_ball][:9]
    kept = with_ball | set(others)
    folder = tmp_path / "rig" / "photos"
    folder.mkdir(parents=True)
    document["images"] = [i for i in document["images"] if i["id"] in kept]
    for image in document["images"]:
        shutil.copy(COCO_MINI / "val2017" / image["file_name"], folder / image["file_name"])
    document["annotations"] = [a for a in document["annotations"] if a["image_id"] in kept]
    for category in document["categories"]:
        if category["name"] == "sports ball":
            category["name"] = "ball"
    return write_json(tmp_path / "rig" / "labels.json", document), folder


def test_the_workflow_merges_coco_mini_with_a_split_aliased_dataset(tmp_path, rig_folder):
    labels, photos = rig_folder
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["datasets"] = {
        "mini": {
            split: {
                "images": str(COCO_MINI / f"{split}2017"),
                "annotations": str(COCO_MINI / f"annotations/instances_{split}2017.json"),
            }
            for split in ("train", "val")
        },
        "rig": {
            "all": {"images": str(photos), "annotations": str(labels)},
            "val_split": {"fraction": 0.3, "seed": 1},
            "aliases": {"ball": "sports ball"},
        },
    }
    config["subsets"] = {
        "pb": {
            "dataset": ["mini", "rig"],
            "categories": ["person", "sports ball"],
            "balance": "none",
            "masks": True,
        }
    }
    planned = planned_jobs(tmp_path, config)
    assert (planned["split_dataset"], planned["merge"], planned["filter"]) == (1, 2, 2)
    snakemake(tmp_path, config, "data")
    data = tmp_path / "results" / "pb" / "data"
    for split in ("train", "val"):
        rig_split = json.loads((tmp_path / "results" / "splits" / "rig" / f"{split}.json").read_text())
        mini = json.loads((COCO_MINI / f"annotations/instances_{split}2017.json").read_text())
        merged = json.loads((data / f"{split}_merged.json").read_text())
        assert len(merged["images"]) == len(mini["images"]) + len(rig_split["images"])
        final = json.loads((data / f"{split}.json").read_text())
        assert [c["name"] for c in final["categories"]] == ["person", "sports ball"]
        assert {image["source"]["dataset"] for image in final["images"]} == {"mini", "rig"}
        for image in final["images"]:  # every name resolves in the split's folder of links
            dataset, original = image["file_name"].split("/", 1)
            assert dataset == image["source"]["dataset"] and original == image["source"]["file_name"]
            folder = photos if dataset == "rig" else COCO_MINI / f"{split}2017"
            assert os.path.samefile(data / f"{split}_images" / image["file_name"], folder / original)
        counts = pd.read_csv(tmp_path / "results" / "pb" / "stats" / "counts.csv")
        rows = counts[counts.split == split].set_index(["step", "category"])
        rig_ball = sum(
            1
            for a in rig_split["annotations"]
            if a["category_id"] == next(c["id"] for c in rig_split["categories"] if c["name"] == "ball")
        )
        assert rig_ball > 0 and rows.loc[("input: rig", "sports ball"), "instances"] == rig_ball
        assert rows.loc[("input: rig", "sports ball"), "dataset"] == "rig"
        assert rows.loc[("filtered", "sports ball"), "instances"] == (
            rows.loc[("input: rig", "sports ball"), "instances"]
            + rows.loc[("input: mini", "sports ball"), "instances"]
        )
        assert rows.loc[("filtered", "person"), "dataset"] == "merged"
        assert list((tmp_path / "results" / "pb" / "masks" / split).rglob("*.png"))
    plan = snakemake(tmp_path, config, "--dry-run", "results/pb/model/model_final.pth")
    assert "results/pb/data/train_images" in plan[plan.index("rule train:") :].split("output:")[0]


def test_a_link_out_of_a_merged_datasets_image_folder_is_refused(tmp_path, rig_folder, capsys):
    labels, photos = rig_folder
    document = json.loads(labels.read_text())
    first = document["images"][0]["file_name"]
    (photos / first).unlink()
    (photos / first).symlink_to(COCO_MINI / "val2017" / first)  # a link leaving the folder
    arguments = ["merge", "--dataset", "coco", str(COCO_TRAIN), str(COCO_MINI / "train2017")]
    arguments += ["--dataset", "rig", str(labels), str(photos), "-o", str(tmp_path / "m.json")]
    assert main([*arguments, "--images-out", str(tmp_path / "images")]) == 2
    assert "is a link pointing out of the image folder" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_an_image_one_dataset_trains_on_and_another_validates_on_is_refused(tmp_path):
    """The `rig` here labels coco-mini val photos (in their own folder), which coco's val split
    already holds: merging the train splits must see the other split too."""
    document = json.loads((COCO_MINI / "annotations" / "instances_val2017.json").read_text())
    document["images"] = document["images"][:5]
    kept = {image["id"] for image in document["images"]}
    document["annotations"] = [a for a in document["annotations"] if a["image_id"] in kept]
    rig = write_json(tmp_path / "rig_train.json", document)
    train = [
        MergeSource("coco", str(COCO_TRAIN), str(COCO_MINI / "train2017")),
        MergeSource("rig", str(rig), str(COCO_MINI / "val2017")),
    ]
    coco_val = MergeSource(
        "coco", str(COCO_MINI / "annotations/instances_val2017.json"), str(COCO_MINI / "val2017")
    )
    merge_files(train, str(tmp_path / "without_the_other_split.json"))  # each split alone is fine
    with pytest.raises(D2RetrainError, match="would be in train and val"):
        merge_files(train, str(tmp_path / "m.json"), other_split=[coco_val])
    assert not (tmp_path / "m.json").exists()


def test_one_dataset_with_aliases_and_a_name_with_regex_characters(tmp_path, rig_folder):
    labels, photos = rig_folder
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["datasets"] = {
        "rig+v1": {
            "all": {"images": str(photos), "annotations": str(labels)},
            "val_split": {"fraction": 0.3},
            "aliases": {"ball": "sports ball"},
        }
    }
    config["subsets"] = {
        "pb": {"dataset": "rig+v1", "categories": ["person", "sports ball"], "balance": "none"}
    }
    snakemake(tmp_path, config, "data")
    train = json.loads((tmp_path / "results" / "pb" / "data" / "train.json").read_text())
    ball = [c["id"] for c in train["categories"] if c["name"] == "sports ball"]
    assert ball and any(a["category_id"] == ball[0] for a in train["annotations"])
    assert (tmp_path / "results" / "splits" / "rig+v1" / "train.json").is_file()
