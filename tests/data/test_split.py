"""One annotation file split into train and val: the library, the CLI and the workflow."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import COCO_MINI, REPO, make_coco, write_json
from helpers.workflow import planned_jobs, snakemake
from hypothesis import given, settings
from hypothesis import strategies as st

from d2retrain.cli import main
from d2retrain.core.errors import D2RetrainError
from d2retrain.data.split import split_file

MINI_ALL = COCO_MINI / "annotations" / "instances_val2017.json"  # 55 photos, 80 categories


def images_per_category(document: dict) -> dict[int, set[int]]:
    found: dict[int, set[int]] = {}
    for annotation in document["annotations"]:
        found.setdefault(annotation["category_id"], set()).add(annotation["image_id"])
    return found


def check_split(source: dict, train: dict, val: dict, fraction: float) -> None:
    """Every image on exactly one side with its annotations, byte for byte; every category with
    2 images or more on both sides; val at least the fraction asked."""
    ids = {
        side: {image["id"] for image in document["images"]} for side, document in (("t", train), ("v", val))
    }
    assert not ids["t"] & ids["v"]
    assert ids["t"] | ids["v"] == {image["id"] for image in source["images"]}
    for document in (train, val):
        assert {k: v for k, v in document.items() if k not in ("images", "annotations")} == {
            k: v for k, v in source.items() if k not in ("images", "annotations")
        }  # info, licenses, categories, any other key
    by_id = {image["id"]: image for image in source["images"]}
    assert all(by_id[image["id"]] == image for image in train["images"] + val["images"])
    annotations = {annotation["id"]: annotation for annotation in source["annotations"]}
    for document, side in ((train, "t"), (val, "v")):
        assert all(annotations[a["id"]] == a and a["image_id"] in ids[side] for a in document["annotations"])
    assert len(train["annotations"]) + len(val["annotations"]) == len(source["annotations"])
    sides = (images_per_category(train), images_per_category(val))
    for category, images in images_per_category(source).items():
        if len(images) >= 2:
            assert category in sides[0] and category in sides[1], category
    target = min(len(source["images"]) - 1, max(1, round(fraction * len(source["images"]))))
    if len(val["images"]) < target:  # only when each train image is some category's last there
        shared = {c for c, images in images_per_category(source).items() if len(images) >= 2}
        on_train = images_per_category(train)
        needed = {image for c in shared if len(on_train[c]) == 1 for image in on_train[c]}
        assert ids["t"] <= needed, (len(val["images"]), target)


def test_coco_mini_splits_with_every_category_on_both_sides_and_the_seed_decides(tmp_path):
    source = json.loads(MINI_ALL.read_text())
    split_file(str(MINI_ALL), str(tmp_path / "t.json"), str(tmp_path / "v.json"), 0.2, seed=0)
    train, val = (json.loads((tmp_path / name).read_text()) for name in ("t.json", "v.json"))
    check_split(source, train, val, 0.2)
    shared = [c for c, images in images_per_category(source).items() if len(images) >= 2]
    assert len(shared) >= 40  # the property is tested on many categories, not a few
    split_file(str(MINI_ALL), str(tmp_path / "t2.json"), str(tmp_path / "v2.json"), 0.2, seed=0)
    assert (tmp_path / "t2.json").read_bytes() == (tmp_path / "t.json").read_bytes()
    assert (tmp_path / "v2.json").read_bytes() == (tmp_path / "v.json").read_bytes()
    split_file(str(MINI_ALL), str(tmp_path / "t3.json"), str(tmp_path / "v3.json"), 0.2, seed=1)
    assert (tmp_path / "v3.json").read_bytes() != (tmp_path / "v.json").read_bytes()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from([1, 3, 37]), max_size=3), min_size=2, max_size=25),
    st.floats(0.05, 0.9),
    st.integers(0, 5),
)
def test_any_file_splits_with_the_properties_or_a_clear_error(tmp_path_factory, images, fraction, seed):
    folder = tmp_path_factory.mktemp("split")
    source = make_coco(images)
    path = write_json(folder / "in.json", source)
    try:
        split_file(str(path), str(folder / "t.json"), str(folder / "v.json"), fraction, seed)
    except D2RetrainError as error:
        assert "on both sides" in str(error) or "no annotation" in str(error), error
        return
    train, val = (json.loads((folder / name).read_text()) for name in ("t.json", "v.json"))
    check_split(source, train, val, fraction)


def test_split_command_writes_both_sides_and_refuses_what_cannot_be_split(tmp_path, capsys):
    arguments = ["split", str(MINI_ALL), "-o", str(tmp_path / "t.json"), str(tmp_path / "v.json")]
    assert main([*arguments, "--val-fraction", "0.3", "--seed", "4"]) == 0
    val = json.loads((tmp_path / "v.json").read_text())
    assert len(val["images"]) >= round(0.3 * len(json.loads(MINI_ALL.read_text())["images"]))
    assert main([*arguments, "--val-fraction", "1.5"]) == 2
    assert "val fraction must be in (0, 1)" in capsys.readouterr().err
    one = write_json(tmp_path / "one.json", make_coco([[1]]))
    assert main(["split", str(one), "-o", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "1 image(s) cannot be split" in capsys.readouterr().err


def whole_dataset_config(**split) -> dict:
    """coco-mini's train file given whole, split by the workflow, for two subsets."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["datasets"] = {
        "mini": {
            "all": {
                "images": str(COCO_MINI / "train2017"),
                "annotations": str(COCO_MINI / "annotations/instances_train2017.json"),
            },
            "val_split": {"fraction": 0.25} | split,
        }
    }
    config["subsets"] = {
        "people": {"dataset": "mini", "categories": ["person"], "balance": "none"},
        "vehicles": {"dataset": "mini", "categories": ["car", "bus"], "balance": "none"},
    }
    return config


def test_a_dataset_given_as_one_file_is_split_once_for_every_subset(tmp_path):
    config = whole_dataset_config()
    assert planned_jobs(tmp_path, config)["split_dataset"] == 1
    snakemake(tmp_path, config, "data")
    splits = tmp_path / "results" / "splits" / "mini"
    source = json.loads((COCO_MINI / "annotations/instances_train2017.json").read_text())
    train, val = (json.loads((splits / f"{side}.json").read_text()) for side in ("train", "val"))
    check_split(source, train, val, 0.25)
    for subset, names in (("people", ["person"]), ("vehicles", ["car", "bus"])):
        data = tmp_path / "results" / subset / "data"
        for side, document in (("train", train), ("val", val)):
            filtered = json.loads((data / f"{side}.json").read_text())
            assert [c["name"] for c in filtered["categories"]] == names
            assert {image["id"] for image in filtered["images"]} <= {
                image["id"] for image in document["images"]
            }
        counts = (tmp_path / "results" / subset / "stats" / "counts.csv").read_text()
        assert "val" in counts and "train" in counts
    log = (tmp_path / "logs" / "splits" / "mini.log").read_text()
    assert "val fraction 0.25, seed 0" in log
    # another seed replans the split and what depends on it, for both subsets; with a test fraction,
    # each subset's evaluation covers its test split too (one job: the model loaded once)
    replanned = planned_jobs(tmp_path, whole_dataset_config(seed=3))
    assert replanned["split_dataset"] == 1 and replanned["filter"] == 4
    replanned = planned_jobs(tmp_path, whole_dataset_config(seed=3, test_fraction=0.2))
    assert replanned["split_dataset_test"] == 1 and replanned["filter"] == 6
    assert replanned["evaluate_with_test"] == 2 and "evaluate" not in replanned


@pytest.mark.parametrize(
    ("dataset", "words"),
    [
        ({"all": {"images": "x", "annotations": "y.json"}}, "val_split"),
        (
            {
                "all": {"images": "x", "annotations": "y.json"},
                "val_split": {"fraction": 0.2},
                "val": {"images": "x", "annotations": "v.json"},
            },
            r"datasets.mini needs train \+ val or all \+ val_split; it has all, val",  # YAML sorts keys
        ),
        ({"all": {"images": "x", "annotations": "y.json"}, "val_split": {"fraction": 1}}, "fraction|1"),
    ],
)
def test_a_dataset_with_both_forms_or_no_val_split_is_refused(tmp_path, dataset, words):
    config = whole_dataset_config()
    config["datasets"]["mini"] = dataset
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path)]
    command += ["--configfile", str(tmp_path / "config.yaml"), "--dry-run"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert re.search(words, result.stdout + result.stderr), result.stdout + result.stderr


def test_the_split_module_keeps_top_level_keys_it_does_not_know(tmp_path):
    document = make_coco([[1], [1], [3], [3]])
    document["extra"] = {"kept": True}
    path = write_json(tmp_path / "in.json", document)
    split_file(str(path), str(tmp_path / "t.json"), str(tmp_path / "v.json"), 0.5, 0)
    for name in ("t.json", "v.json"):
        assert json.loads(Path(tmp_path / name).read_text())["extra"] == {"kept": True}


def test_a_test_fraction_holds_out_val_and_test_and_train_keeps_every_category(tmp_path, capsys):
    source = json.loads(MINI_ALL.read_text())
    names = [str(tmp_path / f"{side}.json") for side in ("t", "v", "x")]
    split_file(str(MINI_ALL), *names[:2], 0.2, seed=0, test_path=names[2], test_fraction=0.2)
    train, val, test = (json.loads(Path(name).read_text()) for name in names)
    held_out = {
        **source,
        "images": val["images"] + test["images"],
        "annotations": val["annotations"] + test["annotations"],
    }
    check_split(source, train, held_out, 0.4)  # every category with 2 images or more keeps one in train
    check_split(held_out, val, test, 0.5)  # and has one in val and one in test when 2 or more are held out
    assert len(test["images"]) >= 11 and len(val["images"]) >= 11
    again = [str(tmp_path / f"{side}2.json") for side in ("t", "v", "x")]
    split_file(str(MINI_ALL), *again[:2], 0.2, seed=0, test_path=again[2], test_fraction=0.2)
    assert all(Path(a).read_bytes() == Path(b).read_bytes() for a, b in zip(names, again, strict=True))

    without = [str(tmp_path / f"{side}0.json") for side in ("t", "v")]  # no test fraction: as before
    assert main(["split", str(MINI_ALL), "-o", *without]) == 0
    split_file(str(MINI_ALL), str(tmp_path / "t1.json"), str(tmp_path / "v1.json"), 0.2, seed=0)
    assert Path(without[1]).read_bytes() == (tmp_path / "v1.json").read_bytes()
    command = ["split", str(MINI_ALL), "-o", *names[:2], "--test-output", names[2], "--test-fraction", "0.2"]
    assert main(command) == 0 and json.loads(Path(names[2]).read_text()) == test
    assert main(["split", str(MINI_ALL), "-o", *names[:2], "--test-fraction", "0.2"]) == 2  # no --test-output
    assert main([*command, "--val-fraction", "0.6", "--test-fraction", "0.5"]) == 2
    assert "must add up to under 1" in capsys.readouterr().err
