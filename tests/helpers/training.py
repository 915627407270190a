"""Training settings and data the training tests share: a tiny schedule, a small detectron2 net,
coco-mini filtered to person and sports ball, a tiny training on it, its evaluation and curves."""

import json
from collections import defaultdict
from pathlib import Path

import pytest

from d2retrain.data.filtering import FilterOptions
from d2retrain.data.prepare import filter_file
from d2retrain.model.engines import evaluate_model
from d2retrain.train.loop import scalar_tag
from d2retrain.train.run import train_from_config
from helpers import COCO_MINI

TINY = {
    "iterations": 4,
    "images_per_batch": 2,
    "checkpoint_period": 2,
    "eval_period": 0,
    "warmup_iterations": 2,
    "steps": [3],
    "min_size_train": [128],
    "max_size_train": 200,
    "base_lr": 0.005,
    "device": "cpu",
}

TINY_TEST = {"min_size_test": 128, "max_size_test": 200}
"""The test-time sizes (model section) that go with :data:`TINY`'s training sizes."""

# detectron2's R50-FPN with few proposals and regions: a few CPU seconds per iteration
D2_SMALL = {
    "engine": "detectron2",
    "architecture": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
    "rpn_post_nms_topk_train": 100,
    "roi_batch_size_per_image": 32,
    **TINY_TEST,
}


def write_mini_split(folder: Path) -> tuple[Path, dict[str, str]]:
    """coco-mini filtered to person + sports ball, as the workflow does; the val split is cut to its
    images with a sports ball and 7 with persons only (10 of 39), so that the evaluations during
    training that these tests make (each untrained model predicts 100 instances per photo) are quick."""
    paths = {}
    for split in ("train", "val"):
        source = COCO_MINI / "annotations" / f"instances_{split}2017.json"
        filter_file(str(source), str(folder / f"{split}.json"), ["person", "sports ball"], FilterOptions())
        paths[split] = str(folder / f"{split}.json")
    val = json.loads(Path(paths["val"]).read_text())
    ball = {a["image_id"] for a in val["annotations"] if a["category_id"] == 2}
    persons_only = sorted(image["id"] for image in val["images"] if image["id"] not in ball)
    kept = ball | set(persons_only[:7])
    val["images"] = [image for image in val["images"] if image["id"] in kept]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in kept]
    Path(paths["val"]).write_text(json.dumps(val))
    return folder, paths


def mini_inputs(paths: dict, output, **overrides) -> dict:
    """The data arguments of train_from_config for the filtered coco-mini splits."""
    return {
        "classes": ["person", "sports ball"],
        "train_json": paths["train"],
        "train_images": str(COCO_MINI / "train2017"),
        "val_json": paths["val"],
        "val_images": str(COCO_MINI / "val2017"),
        "source_json": str(COCO_MINI / "annotations/instances_train2017.json"),
        "output_dir": str(output),
        "threads": 2,
    } | overrides


def evaluate_mini(model_dir, paths: dict, folder, classes: list[str], metrics: str, per_class: str) -> dict:
    """Evaluate a model folder on the filtered coco-mini val split, writing into ``folder``."""
    return evaluate_model(
        str(model_dir),
        paths["val"],
        str(COCO_MINI / "val2017"),
        classes,
        str(folder / metrics),
        str(folder / per_class),
        device="cpu",
    )


def assert_tensorboard_shows_the_metrics(model_dir) -> dict[str, list]:
    """The event files under ``model_dir/tensorboard`` hold exactly the scalars of ``metrics.jsonl``
    (each iteration once, even after a resume); returns them by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(model_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    shown = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected = defaultdict(list)
    for line in (model_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "iteration":
                expected[scalar_tag(key)].append((record["iteration"], pytest.approx(value, rel=1e-6)))
    assert shown == expected
    return shown


def train_mini(folder, paths, output, mlflow=None, **train) -> None:
    model = {"engine": "torchvision", "architecture": "maskrcnn_resnet18_fpn", **TINY_TEST}
    train_from_config(model=model, train=TINY | train, mlflow=mlflow, **mini_inputs(paths, output))


def kill_during_step(monkeypatch, call: int):
    """Make the torchvision engine's training step raise KeyboardInterrupt (a kill) at its
    ``call``-th call; returns the function that brings the real step back."""
    import d2retrain.train.tv as tv_train

    real_step = tv_train._step
    calls = {"n": 0}

    def dying_step(*args):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(tv_train, "_step", dying_step)
    return lambda: monkeypatch.setattr(tv_train, "_step", real_step)
