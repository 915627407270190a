"""Several training processes: gloo on the CPU in step, resumes across process counts, launches refused."""

import json
import logging

import pytest
import torch
from helpers import filled
from helpers.training import (
    TINY,
    mini_inputs,
    train_mini,
)

from d2retrain.core.errors import D2RetrainError
from d2retrain.model.folder import ModelFolder
from d2retrain.train.job import distributed_spec
from d2retrain.train.run import train_from_config


@pytest.fixture
def job_log(tmp_path):
    """A file handler on the root logger, as a workflow job has: training processes log to it."""
    path = tmp_path / "train.log"
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield path
    root.removeHandler(handler)
    root.setLevel(level)
    handler.close()


@pytest.mark.slow
def test_two_gloo_processes_train_in_step_and_write_one_checkpoint(mini_split, tmp_path, job_log):
    folder, paths = mini_split
    train_mini(folder, paths, tmp_path / "model", num_gpus=2, eval_period=2)
    log = job_log.read_text()
    assert "starting 2 training processes (machine 0 of 1, 2 in all)" in log
    assert "[rank 1] d2retrain" in log  # the second process logs to the job's log, tagged
    assert "weights identical on all 2 processes" in log
    model = tmp_path / "model"
    lines = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    # rank 0 alone logs: each iteration once, losses averaged over both processes
    assert [line["iteration"] for line in lines if "total_loss" in line] == [1, 2, 3, 4]
    assert [line["iteration"] for line in lines if "segm_AP" in line] == [2, 4]
    checkpoints = sorted(path.name for path in (model / "checkpoints").iterdir())
    best = json.loads((model / "best.json").read_text())["iteration"]
    assert checkpoints == [
        f"best_{best:07d}.pth",
        "metrics.jsonl",
        "model_0000002.pth",
        "model_0000004.pth",
        "state.json",
    ]
    assert log.count("checkpoint at iteration 2:") == 1 and log.count("best so far: segm_AP") in (1, 2)
    state = torch.load(model / "model_final.pth", weights_only=True)["model"]
    assert not any(key.startswith("module.") for key in state)  # the bare network, loadable alone
    assert ModelFolder(model).read_classes().engine == "torchvision"


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_on_one_process(mini_split, tmp_path, job_log):
    """The process count is not part of the fingerprint: a run killed on 2 GPUs may resume on 1."""
    folder, paths = mini_split
    train_mini(folder, paths, tmp_path / "model", num_gpus=2)
    store = tmp_path / "model" / "checkpoints" / "state.json"
    state = json.loads(store.read_text())  # as if killed after the checkpoint at iteration 2:
    killed = {"checkpoint": "model_0000002.pth", "iteration": 2, "finished": False}
    store.write_text(json.dumps(state | killed))
    train_mini(folder, paths, tmp_path / "model")
    assert "model_0000002.pth at iteration 2" in job_log.read_text()
    lines = (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("launch", "words"),
    [
        ({"num_gpus": 3}, "does not split evenly over 3 processes"),
        ({"num_machines": 2, "machine_rank": 2, "dist_url": "tcp://h:1"}, "machine_rank 2 is not in 0..1"),
        ({"num_machines": 2}, "dist_url must name machine 0"),
    ],
)
def test_impossible_launches_are_refused_before_training(launch, words, mini_split, tmp_path):
    folder, paths = mini_split
    with pytest.raises(D2RetrainError, match=words):
        train_mini(folder, paths, tmp_path / "model", **launch)
    assert not (tmp_path / "model").exists()


def test_machine_rank_minus_one_comes_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert distributed_spec(filled("train", {"num_machines": 2, "machine_rank": -1})).machine_rank == 1
    monkeypatch.delenv("SLURM_NODEID")
    with pytest.raises(D2RetrainError, match="SLURM_NODEID is not set"):
        distributed_spec(filled("train", {"machine_rank": -1}))


@pytest.mark.detectron2
def test_detectron2_refuses_several_processes_without_gpus(mini_split, tmp_path):
    _, paths = mini_split
    model = {"engine": "detectron2", "architecture": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"}
    with pytest.raises(D2RetrainError, match="several processes on GPUs only"):
        train_from_config(model=model, train=TINY | {"num_gpus": 2}, **mini_inputs(paths, tmp_path / "m"))
