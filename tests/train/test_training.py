"""Training end to end on coco-mini: both engines train, resume, stop on divergence, train on negatives."""

import json
import logging

import pytest
import torch
from helpers import COCO_MINI, filled
from helpers.training import (
    D2_SMALL,
    TINY,
    assert_tensorboard_shows_the_metrics,
    evaluate_mini,
    kill_during_step,
    mini_inputs,
    train_mini,
)

from d2retrain.core.errors import D2RetrainError
from d2retrain.data.filtering import FilterOptions
from d2retrain.data.prepare import filter_file
from d2retrain.model import tv as tv_engine
from d2retrain.model.folder import ModelFolder
from d2retrain.model.specs import model_spec, solver_spec
from d2retrain.train.loop import TrainingDivergedError
from d2retrain.train.run import train_from_config


def test_torchvision_engine_trains_and_evaluates_on_coco_mini_from_scratch(mini_split, tmp_path, caplog):
    folder, paths = mini_split
    with caplog.at_level(logging.INFO):
        train_mini(folder, paths, tmp_path / "model", eval_period=2, keep_checkpoints=1)
    model = tmp_path / "model"
    progress = [r.getMessage() for r in caplog.records if r.name == "d2retrain.train.progress"]
    assert progress[-2].startswith("iteration 4/4  total_loss: ") and progress[-2].endswith("eta: 0:00:00")
    assert progress[-1].startswith("evaluation at iteration 4/4: segm AP ")  # one line per evaluation
    assert [p.name for p in (model / "checkpoints").glob("model_*.pth")] == ["model_0000004.pth"]  # keep 1
    for name in ("model.pth", "model_final.pth", "classes.json", "config.yaml", "metrics.jsonl", "loss.png"):
        assert (model / name).is_file(), name
    info = ModelFolder(model).read_classes(["person", "sports ball"])
    assert info.source_ids == [1, 37] and info.engine == "torchvision"
    lines = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "total_loss" in line]
    assert [line["iteration"] for line in steps] == [1, 2, 3, 4]
    assert {"total_loss", "loss_mask", "lr", "time", "data_time"} <= set(steps[0])
    evals = [line for line in lines if "segm_AP" in line]  # train.eval_period = 2
    assert [line["iteration"] for line in evals] == [2, 4]
    assert all(0 <= line["bbox_AP"] <= 1 and 0 <= line["segm_AP50"] <= 1 for line in evals)
    scalars = assert_tensorboard_shows_the_metrics(model)
    assert {"loss/total_loss", "loss/loss_mask", "lr", "val/segm_AP", "time/iteration"} <= set(scalars)
    reports = evaluate_mini(model, paths, tmp_path, info.classes, "m.json", "c.csv")
    assert set(reports["retrained"]["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert "sports ball" in (tmp_path / "c.csv").read_text()


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(mini_split, tmp_path, monkeypatch, caplog):
    folder, paths = mini_split
    revive = kill_during_step(monkeypatch, 4)  # killed during iteration 3, after the checkpoint at 2
    with pytest.raises(KeyboardInterrupt):
        train_mini(folder, paths, tmp_path / "model", eval_period=2)
    assert not (tmp_path / "model" / "model_final.pth").exists()
    revive()
    with caplog.at_level(logging.INFO):
        train_mini(folder, paths, tmp_path / "model", eval_period=2)
    assert "at iteration 2" in caplog.text
    lines = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    # the evaluation after iteration 2 survives the kill; nothing is logged twice
    assert [(line["iteration"], "segm_AP" in line) for line in lines] == [
        (1, False),
        (2, False),
        (2, True),
        (3, False),
        (4, False),
        (4, True),
    ]
    assert_tensorboard_shows_the_metrics(tmp_path / "model")  # iterations 2 and 3 once each
    caplog.clear()
    with caplog.at_level(logging.INFO):  # a finished run is not resumed: a forced rerun starts fresh
        train_mini(folder, paths, tmp_path / "model", eval_period=2)
    assert "finished: starting fresh" in caplog.text


def test_a_diverging_run_stops_with_a_clear_error(mini_split, tmp_path):
    folder, paths = mini_split
    with pytest.raises(TrainingDivergedError, match="diverged"):
        train_mini(folder, paths, tmp_path / "model", base_lr=1e6, warmup_iterations=0, max_loss=50)


def test_missing_images_are_listed_before_training(mini_split, tmp_path):
    _, paths = mini_split
    with pytest.raises(D2RetrainError, match=r"images of .* are missing"):
        inputs = mini_inputs(paths, tmp_path / "m", train_images=str(tmp_path), val_images=str(tmp_path))
        train_from_config(model={"architecture": "maskrcnn_resnet18_fpn"}, train=TINY, **inputs)


@pytest.mark.detectron2
def test_detectron2_engine_trains_resumes_and_evaluates_on_coco_mini(mini_split, tmp_path, caplog):
    _, paths = mini_split
    common = mini_inputs(paths, tmp_path / "model")
    model = D2_SMALL
    train = TINY | {"base_lr": 1e-5, "max_loss": 1e5, "eval_period": 2}
    train_from_config(model=model, train=train, **common)
    info = ModelFolder(tmp_path / "model").read_classes(["person", "sports ball"])
    assert info.engine == "detectron2" and info.source_ids == [1, 37]
    lines = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines if "total_loss" in line] == [1, 2, 3, 4]
    assert [line["iteration"] for line in lines if "segm_AP" in line] == [2, 4]
    assert lines[0]["lr"] == pytest.approx(1e-5 * 0.001)
    assert {"loss/loss_mask", "val/segm_AP"} <= set(assert_tensorboard_shows_the_metrics(tmp_path / "model"))
    reports = evaluate_mini(tmp_path / "model", paths, tmp_path, info.classes, "m.json", "c.csv")
    assert set(reports["retrained"]["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    state = json.loads((tmp_path / "model" / "checkpoints" / "state.json").read_text())
    assert state["finished"] and state["iteration"] == 4


@pytest.mark.detectron2
def test_detectron2_rejects_an_unknown_model_zoo_name(mini_split, tmp_path):
    _, paths = mini_split
    with pytest.raises(D2RetrainError, match="model-zoo name"):
        model = {"engine": "detectron2", "architecture": "COCO-InstanceSegmentation/nope.yaml"}
        train_from_config(model=model, train=TINY, **mini_inputs(paths, tmp_path / "m"))


def test_a_class_list_not_matching_the_annotations_is_refused(mini_split, tmp_path):
    _, paths = mini_split
    for classes, words in (
        (["sports ball", "person"], "not the class list"),
        (["person", "kite"], "not the class"),
    ):
        with pytest.raises(D2RetrainError, match=words):
            train_from_config(model={}, train=TINY, **mini_inputs(paths, tmp_path / "m", classes=classes))
    assert not (tmp_path / "m").exists()


def write_negatives_case(folder) -> str:
    """Four 64x48 images: 1 and 4 with a person, 2 without any annotation (a negative), 3 with a
    crowd annotation only (objects are there: not a negative)."""
    import cv2
    import numpy as np

    images = []
    for index in range(1, 5):
        cv2.imwrite(str(folder / f"{index}.png"), np.full((48, 64, 3), 40 * index, np.uint8))
        images.append({"id": index, "file_name": f"{index}.png", "height": 48, "width": 64})
    person = {"category_id": 1, "iscrowd": 0, "area": 400.0, "bbox": [10.0, 10.0, 20.0, 20.0]}
    person["segmentation"] = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    crowd = person | {"iscrowd": 1, "segmentation": {"size": [48, 64], "counts": [500, 20, 2552]}}
    annotations = [person | {"id": 1, "image_id": 1}, crowd | {"id": 2, "image_id": 3}]
    annotations.append(person | {"id": 3, "image_id": 4})
    document = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}
    path = folder / "train.json"
    path.write_text(json.dumps(document))
    return str(path)


def test_negatives_train_and_crowd_only_images_do_not(tmp_path, caplog):
    from d2retrain.data.records import load_records
    from d2retrain.train.samples import TrainSamples

    records = load_records(write_negatives_case(tmp_path), str(tmp_path))
    with caplog.at_level(logging.INFO):
        samples = TrainSamples(records, seed=0, flip=True)
    assert sorted(record.image_id for record in samples.records) == [1, 2, 4]
    assert "1 images without annotations (negatives)" in caplog.text
    assert "1 with only crowd or unusable annotations left out" in caplog.text
    served = {samples.records[samples.index_at(p)].image_id: samples[p] for p in range(3)}
    image, target = served[2]
    assert image.shape == (3, 48, 64)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 48, 64) and target["masks"].dtype == torch.uint8
    assert served[1][1]["masks"].sum() == 400  # an image with an instance keeps its mask


def test_a_batch_of_only_negatives_gives_a_finite_loss_and_gradients():
    torch.manual_seed(0)
    spec = model_spec(filled("model", {"architecture": "maskrcnn_resnet18_fpn"}), "torchvision")
    model = tv_engine.build_model(spec, 2, solver_spec(filled("train", TINY)))
    model.train()
    empty = {
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "masks": torch.zeros((0, 96, 128), dtype=torch.uint8),
    }
    losses = model([torch.rand(3, 96, 128), torch.rand(3, 96, 128)], [empty, empty])
    assert all(torch.isfinite(value) for value in losses.values()), losses
    assert losses["loss_objectness"] > 0 and losses["loss_classifier"] > 0  # background is learnt
    sum(losses.values()).backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)


@pytest.mark.slow
def test_keep_empty_images_trains_on_the_negatives_of_coco_mini(tmp_path, caplog):
    """The filter's keep_empty_images writes the images without a chosen category; training
    counts and uses them (and without the option, there are none)."""
    from d2retrain.data.instances import read_instances

    paths = {}
    for split in ("train", "val"):
        source = COCO_MINI / "annotations" / f"instances_{split}2017.json"
        paths[split] = str(tmp_path / f"{split}.json")
        filter_file(
            str(source), paths[split], ["sports ball"], FilterOptions(keep_empty_images=split == "train")
        )
    document = read_instances(paths["train"])
    negatives = len({i.id for i in document.images} - {a.image_id for a in document.annotations})
    assert negatives > 0
    inputs = mini_inputs(paths, tmp_path / "model", classes=["sports ball"])
    model = {"engine": "torchvision", "architecture": "maskrcnn_resnet18_fpn"}
    with caplog.at_level(logging.INFO):
        train_from_config(model=model, train=TINY | {"iterations": 2}, **inputs)
    assert f"{negatives} images without annotations (negatives)" in caplog.text
    assert (tmp_path / "model" / "model_final.pth").is_file()


@pytest.mark.detectron2
def test_detectron2_trains_on_the_same_images_negatives_included(tmp_path, caplog):
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model as build_detectron2_model

    from d2retrain.model.d2 import build_config

    train_json = write_negatives_case(tmp_path)
    model = D2_SMALL | {"min_size_test": 48}
    train = TINY | {"iterations": 2, "base_lr": 1e-5, "max_loss": 1e5, "min_size_train": [48]}
    inputs = {
        "classes": ["person"],
        "train_json": train_json,
        "train_images": str(tmp_path),
        "val_json": train_json,
        "val_images": str(tmp_path),
        "source_json": train_json,
        "output_dir": str(tmp_path / "model"),
        "threads": 2,
    }
    with caplog.at_level(logging.INFO):
        train_from_config(model=model, train=train, **inputs)
    assert "1 images without annotations (negatives)" in caplog.text
    state = json.loads((tmp_path / "model" / "checkpoints" / "state.json").read_text())
    name = f"d2retrain_{state['fingerprint']}_train"  # other tests of this process register theirs
    trained = {d["image_id"]: d["annotations"] for d in DatasetCatalog.get(name)}
    assert sorted(trained) == [1, 2, 4] and trained[2] == []  # as the torchvision engine trains
    DatasetCatalog.remove(name)

    cfg = build_config(
        model_spec(filled("model", model), "detectron2"), 1, "cpu", solver_spec(filled("train", train))
    )
    network = build_detectron2_model(cfg)
    network.train()
    from detectron2.structures import Boxes, Instances

    batch = [
        {
            "image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8).float(),
            "instances": Instances((64, 96)),
        }
        for _ in range(2)
    ]
    for item in batch:
        item["instances"].gt_boxes = Boxes(torch.zeros((0, 4)))
        item["instances"].gt_classes = torch.zeros((0,), dtype=torch.int64)
    from detectron2.utils.events import EventStorage

    with EventStorage(0):  # detectron2's training forward logs into one
        losses = network(batch)
    assert all(torch.isfinite(value) for value in losses.values()), losses
