"""balance: repeat: LVIS repeat factors, the same numbers for both engines, a resumable order."""

import json
import logging
import math
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import COCO_MINI, REPO, make_coco, write_json
from helpers.training import D2_SMALL, TINY, mini_inputs
from helpers.workflow import snakemake

from d2retrain.cli import main
from d2retrain.data.coco import read_coco
from d2retrain.data.records import load_records
from d2retrain.data.repeat import read_repeat_factors, repeat_factors, write_repeat_factors
from d2retrain.train.run import train_from_config
from d2retrain.train.samples import TrainSamples


def test_factors_follow_the_lvis_rule_on_a_file_with_a_known_frequency(tmp_path):
    # person on all 10 images, car on 1 (f = 0.1), sports ball on 4 (f = 0.4); t = 0.4
    images = [[1]] * 5 + [[1, 37]] * 4 + [[1, 3, 3]]
    factors = repeat_factors(read_coco(write_json(tmp_path / "in.json", make_coco(images))), 0.4)
    assert factors == {**dict.fromkeys(range(1, 10), 1.0), 10: 2.0}  # sqrt(0.4 / 0.1); ball: 1
    factors = repeat_factors(read_coco(tmp_path / "in.json"), 0.9)
    ball = math.sqrt(0.9 / 0.4)
    assert factors == {**dict.fromkeys(range(1, 6), 1.0), 6: ball, 7: ball, 8: ball, 9: ball, 10: 3.0}


@pytest.mark.detectron2
def test_factors_equal_detectron2s_on_coco_mini(mini_split):
    from detectron2.data.datasets import load_coco_json
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    for source, images in (
        (mini_split[1]["train"], COCO_MINI / "train2017"),
        (COCO_MINI / "annotations/instances_train2017.json", COCO_MINI / "train2017"),
    ):
        dicts = load_coco_json(str(source), str(images))
        ours = repeat_factors(read_coco(source), 0.3)
        theirs = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, 0.3)
        assert len(dicts) == len(ours)
        np.testing.assert_allclose([ours[d["image_id"]] for d in dicts], theirs.numpy(), rtol=1e-6)
        assert theirs.max() > 1.5  # rare categories are repeated


def repeated_samples(tmp_path, threshold: float) -> TrainSamples:
    document = make_coco([[1]] * 12 + [[1, 37]] * 3 + [[3]])
    path = write_json(tmp_path / "in.json", document)
    write_repeat_factors(str(path), str(tmp_path / "factors.json"), threshold)
    for image in document["images"]:  # the order is all these tests read: no pixels needed
        (tmp_path / image["file_name"]).touch()
    records = load_records(str(path), str(tmp_path))
    return TrainSamples(records, seed=5, flip=False, repeat=read_repeat_factors(tmp_path / "factors.json"))


def test_each_epoch_repeats_images_by_stochastic_rounding_in_a_resumable_order(tmp_path):
    samples = repeated_samples(tmp_path, 0.5)
    factors = samples.repeat
    assert sorted(set(factors.round(6))) == [1.0, round(math.sqrt(0.5 / (3 / 16)), 6), round(math.sqrt(8), 6)]
    seen = []
    for epoch in range(300):
        counts = np.bincount(samples.epoch(epoch), minlength=len(samples))
        assert ((counts == np.floor(factors)) | (counts == np.ceil(factors))).all()
        seen.append(counts)
    np.testing.assert_allclose(np.mean(seen, axis=0), factors, atol=0.1)  # r on average
    positions = range(0, 2000, 7)
    walked = [samples.index_at(p) for p in positions]
    fresh = repeated_samples(tmp_path, 0.5)  # a resumed run asks from a later position first
    assert [fresh.index_at(p) for p in reversed(positions)] == walked[::-1]
    plain = TrainSamples(samples.records, seed=5, flip=False)  # no repeat: the order as before
    n = len(plain)
    assert [plain.index_at(p) for p in range(3 * n)] == [
        int(np.random.default_rng([5, p // n]).permutation(n)[p % n]) for p in range(3 * n)
    ]


def test_the_torchvision_engine_trains_on_repeated_images(mini_split, tmp_path, caplog):
    write_repeat_factors(mini_split[1]["train"], str(tmp_path / "factors.json"), 0.3)
    inputs = mini_inputs(mini_split[1], tmp_path / "model")
    with caplog.at_level(logging.INFO):
        train_from_config(
            model={"architecture": "maskrcnn_resnet18_fpn"},
            train=TINY | {"iterations": 2, "steps": []},
            repeat_factors=str(tmp_path / "factors.json"),
            **inputs,
        )
    found = re.search(r"repeat factors: ([\d.]+) samples per epoch of (\d+) images", caplog.text)
    assert found and float(found.group(1)) > int(found.group(2)), caplog.text


@pytest.mark.detectron2
def test_detectron2_samples_by_the_same_factors(mini_split, tmp_path, monkeypatch):
    from detectron2.data import samplers

    used = {}

    class Recording(samplers.RepeatFactorTrainingSampler):
        def __init__(self, factors, **kwargs):
            used["factors"], used["seed"] = factors, kwargs.get("seed")
            super().__init__(factors, **kwargs)

    monkeypatch.setattr(samplers, "RepeatFactorTrainingSampler", Recording)
    write_repeat_factors(mini_split[1]["train"], str(tmp_path / "factors.json"), 0.3)
    train = TINY | {"iterations": 2, "steps": [], "base_lr": 1e-5, "max_loss": 1e5, "seed": 7}
    train_from_config(
        model=D2_SMALL,
        train=train,
        repeat_factors=str(tmp_path / "factors.json"),
        **mini_inputs(mini_split[1], tmp_path / "model"),
    )
    factors = read_repeat_factors(tmp_path / "factors.json")
    records = load_records(mini_split[1]["train"], str(COCO_MINI / "train2017"))
    trained = [r.image_id for r in records if r.trains]  # detectron2's dataset order: the file's
    assert used["factors"].tolist() == pytest.approx([factors[i] for i in trained])
    assert used["seed"] == 7


def test_the_workflow_writes_factors_counts_them_and_gives_them_to_training(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["subsets"]["person_ball"] |= {"balance": "repeat", "repeat_threshold": 0.9}
    snakemake(tmp_path, config, "data")
    data = tmp_path / "results/person_ball/data"
    assert (data / "train.json").read_bytes() == (data / "train_filtered.json").read_bytes()  # none dropped
    factors = read_repeat_factors(data / "train_repeat_factors.json")
    assert factors == repeat_factors(read_coco(data / "train.json"), 0.9)
    counts = pd.read_csv(tmp_path / "results/person_ball/stats/counts.csv")
    repeated = counts[counts.step == "repeat"].set_index("category")
    balanced = counts[(counts.step == "balanced") & (counts.split == "train")].set_index("category")
    assert (repeated.instances >= balanced.instances).all()
    rarest = balanced.images.idxmin()
    assert repeated.images[rarest] > balanced.images[rarest]  # the rare class is shown more often
    plan = snakemake(tmp_path, config, "--dry-run", "results/person_ball/model/model_final.pth")
    train_job = plan[plan.index("rule train:") :]
    assert "results/person_ball/data/train_repeat_factors.json" in train_job.split("output:")[0]


def test_repeat_factors_command(tmp_path):
    path = write_json(tmp_path / "in.json", make_coco([[1]] * 9 + [[1, 3]]))
    assert (
        main(["repeat-factors", "-i", str(path), "-o", str(tmp_path / "f.json"), "--threshold", "0.4"]) == 0
    )
    assert json.loads((tmp_path / "f.json").read_text())["factors"] == [1.0] * 9 + [2.0]
