"""The best evaluation during training: kept, served, through a kill; patience; train.keep: final."""

import json
import logging

import pytest
import torch
from helpers.training import (
    D2_SMALL,
    TINY,
    mini_inputs,
    train_mini,
)

from d2retrain.model.folder import ModelFolder
from d2retrain.train import tv as tv_train
from d2retrain.train.run import train_from_config


def scripted_evaluations(monkeypatch, values: dict[int, float]) -> dict[int, dict]:
    """The torchvision engine's evaluations during training give ``values[iteration]`` as segm AP
    (the real evaluation's reproduction is checked on the main job, tests/test_workflow.py); the
    weights each was given are returned by iteration."""
    seen: dict[int, dict] = {}

    def evaluate_now(job, run, iteration):
        seen[iteration] = {k: v.clone() for k, v in run.model.state_dict().items()}
        return {"iteration": iteration, "segm_AP": values[iteration], "bbox_AP": 0.0}

    monkeypatch.setattr(tv_train, "_evaluate_now", evaluate_now)
    return seen


def same_weights(path, state: dict) -> bool:
    saved = torch.load(path, weights_only=True)["model"]
    return saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


@pytest.mark.slow
def test_the_best_evaluation_is_kept_served_and_survives_a_kill(mini_split, tmp_path, monkeypatch):
    folder, paths = mini_split
    values = {2: 0.1, 4: 0.3, 6: 0.2, 8: 0.25}
    seen = scripted_evaluations(monkeypatch, values)
    train = {"iterations": 8, "eval_period": 2, "checkpoint_period": 2, "steps": []}
    train_mini(folder, paths, tmp_path / "whole", **train)
    whole = tmp_path / "whole"
    best = json.loads((whole / "best.json").read_text())
    assert best == {
        "iteration": 4,
        "metric": "segm_AP",
        "value": 0.3,
        "final_iteration": 8,
        "kept": "model_best.pth",
        "served": "model.pth",
    }
    assert same_weights(whole / "model_best.pth", seen[4])  # the evaluated weights, not later ones
    assert same_weights(whole / "model_final.pth", {k: v for k, v in seen[8].items()})
    assert ModelFolder(whole).read_classes().model_file == "model_best.pth"
    assert ModelFolder(whole).served_weights() == whole / "model.pth"
    assert (whole / "model.pth").read_bytes() == (whole / "model_best.pth").read_bytes()
    assert [p.name for p in (whole / "checkpoints").glob("best_*.pth")] == ["best_0000004.pth"]

    real_step, calls = tv_train._step, {"n": 0}

    def dying_step(*args):
        calls["n"] += 1
        if calls["n"] == 6:  # killed during the 6th iteration: the checkpoint at 4 holds best = 4
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(tv_train, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_mini(folder, paths, tmp_path / "killed", **train)
    monkeypatch.setattr(tv_train, "_step", real_step)
    train_mini(folder, paths, tmp_path / "killed", **train)
    killed = tmp_path / "killed"
    assert json.loads((killed / "best.json").read_text()) == best
    assert (killed / "model_best.pth").read_bytes() == (whole / "model_best.pth").read_bytes()


@pytest.mark.slow
def test_patience_stops_training_after_evaluations_without_improvement(
    mini_split, tmp_path, monkeypatch, caplog
):
    folder, paths = mini_split
    scripted_evaluations(monkeypatch, {2: 0.1, 4: 0.3, 6: 0.2, 8: 0.25, 10: 0.9, 12: 0.95})
    train = {"iterations": 12, "eval_period": 2, "checkpoint_period": 4, "steps": [], "patience": 2}
    with caplog.at_level(logging.INFO):
        train_mini(folder, paths, tmp_path / "model", **train)
    assert (
        "stopping early after iteration 8: 2 evaluations without a better segm_AP than 0.3000" in caplog.text
    )
    lines = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines if "total_loss" in line] == list(range(1, 9))
    state = json.loads((tmp_path / "model" / "checkpoints" / "state.json").read_text())
    assert state["finished"] and state["iteration"] == 8
    assert json.loads((tmp_path / "model" / "best.json").read_text())["final_iteration"] == 8


@pytest.mark.slow
def test_keep_final_or_no_evaluation_serves_the_last_weights(mini_split, tmp_path, monkeypatch):
    folder, paths = mini_split
    scripted_evaluations(monkeypatch, {2: 0.5, 4: 0.1})
    train_mini(folder, paths, tmp_path / "final", eval_period=2, keep="final")
    assert ModelFolder(tmp_path / "final").read_classes().model_file == "model_final.pth"
    served = (tmp_path / "final" / "model.pth").read_bytes()
    assert served == (tmp_path / "final" / "model_final.pth").read_bytes()
    assert served != (tmp_path / "final" / "model_best.pth").read_bytes()
    best = json.loads((tmp_path / "final" / "best.json").read_text())
    assert (best["iteration"], best["kept"]) == (2, "model_final.pth")  # described, not served
    train_mini(folder, paths, tmp_path / "none")  # TINY: eval_period 0
    assert ModelFolder(tmp_path / "none").read_classes().model_file == "model_final.pth"
    assert json.loads((tmp_path / "none" / "best.json").read_text())["iteration"] is None
    assert not (tmp_path / "none" / "model_best.pth").exists()


@pytest.mark.detectron2
def test_detectron2_keeps_the_best_evaluation_and_stops_with_patience(
    mini_split, tmp_path, monkeypatch, caplog
):
    from d2retrain.train import d2 as d2_train

    _, paths = mini_split
    seen: dict[int, dict] = {}

    def evaluate_now(trainer, done):
        weights = d2_train._bare(trainer.model).state_dict()
        seen[done] = {k: v.clone() for k, v in weights.items()}
        return {"iteration": done, "segm_AP": {2: 0.2, 4: 0.1, 6: 0.05, 8: 0.9}[done], "bbox_AP": 0}

    monkeypatch.setattr(d2_train, "_evaluate_now", evaluate_now)
    model = D2_SMALL
    train = TINY | {
        "iterations": 8,
        "base_lr": 1e-5,
        "max_loss": 1e5,
        "eval_period": 2,
        "patience": 2,
        "steps": [],
    }
    with caplog.at_level(logging.INFO):
        train_from_config(model=model, train=train, **mini_inputs(paths, tmp_path / "model"))
    output = tmp_path / "model"
    assert "stopping early after iteration 6" in caplog.text
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines if "total_loss" in line] == list(range(1, 7))
    best = json.loads((output / "best.json").read_text())
    assert (best["iteration"], best["value"], best["final_iteration"]) == (2, 0.2, 6)
    assert ModelFolder(output).read_classes().model_file == "model_best.pth"
    assert (output / "model.pth").read_bytes() == (output / "model_best.pth").read_bytes()
    assert same_weights(output / "model_best.pth", seen[2])
    assert same_weights(output / "model_final.pth", seen[6])  # the weights it stopped with


@pytest.mark.detectron2
def test_detectron2_resumes_with_the_best_of_its_past_through_its_own_hooks(
    mini_split, tmp_path, monkeypatch
):
    """detectron2's BestCheckpointer alone would forget the best at a resume and take the next
    evaluation (0.2 at 6) for the best; the workflow's hook starts from the checkpoint's record."""
    from d2retrain.train import d2 as d2_train

    _, paths = mini_split
    seen: dict[int, dict] = {}

    def evaluate_now(trainer, done):
        seen[done] = {k: v.clone() for k, v in d2_train._bare(trainer.model).state_dict().items()}
        return {"iteration": done, "segm_AP": {2: 0.5, 4: 0.1, 6: 0.2, 8: 0.3}[done], "bbox_AP": 0.0}

    monkeypatch.setattr(d2_train, "_evaluate_now", evaluate_now)
    real_step, calls = d2_train.WorkflowTrainer.run_step, {"n": 0}

    def dying_step(trainer):
        calls["n"] += 1
        if calls["n"] == 6:  # killed during the 6th iteration: the checkpoint at 4 holds best = 2
            raise KeyboardInterrupt
        return real_step(trainer)

    monkeypatch.setattr(d2_train.WorkflowTrainer, "run_step", dying_step)
    train = TINY | {"iterations": 8, "base_lr": 1e-5, "eval_period": 2, "checkpoint_period": 2, "steps": []}
    output = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        train_from_config(model=D2_SMALL, train=train, **mini_inputs(paths, output))
    state = json.loads((output / "checkpoints" / "state.json").read_text())
    assert (state["iteration"], state["best"]["iteration"]) == (4, 2)
    monkeypatch.setattr(d2_train.WorkflowTrainer, "run_step", real_step)
    train_from_config(model=D2_SMALL, train=train, **mini_inputs(paths, output))
    best = json.loads((output / "best.json").read_text())
    assert (best["iteration"], best["value"], best["final_iteration"]) == (2, 0.5, 8)
    assert same_weights(output / "model_best.pth", seen[2]) and sorted(seen) == [2, 4, 6, 8]
    assert same_weights(output / "model_final.pth", seen[8])
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines if "total_loss" in line] == list(range(1, 9))
    assert [line["iteration"] for line in lines if "segm_AP" in line] == [2, 4, 6, 8]


@pytest.mark.detectron2
def test_detectron2_does_not_evaluate_weights_that_diverged_in_the_last_iteration(mini_split, monkeypatch):
    from d2retrain.train import d2 as d2_train
    from d2retrain.train.loop import TrainingDivergedError

    _, paths = mini_split
    evaluated: list[int] = []

    def evaluate_now(trainer, done):
        evaluated.append(done)
        return {"iteration": done, "segm_AP": 0.1, "bbox_AP": 0.0}

    def check_losses(losses, iteration, max_loss):
        if iteration == 4:  # the last one, an evaluation's iteration
            raise TrainingDivergedError("training diverged at iteration 4 (test)")

    monkeypatch.setattr(d2_train, "_evaluate_now", evaluate_now)
    monkeypatch.setattr(d2_train, "check_losses", check_losses)
    train = TINY | {"iterations": 4, "base_lr": 1e-5, "eval_period": 2, "steps": []}
    with pytest.raises(TrainingDivergedError, match="iteration 4"):
        train_from_config(model=D2_SMALL, train=train, **mini_inputs(paths, mini_split[0] / "diverged"))
    assert evaluated == [2]  # not the weights that diverged
