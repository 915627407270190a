"""Training units: the learning-rate schedule, the divergence guard, the checkpoint store, engines by name."""

import pytest
import torch
from helpers import filled

from d2retrain.core.errors import D2RetrainError
from d2retrain.model.engines import resolve_engine
from d2retrain.model.specs import solver_spec
from d2retrain.train.job import lr_factor
from d2retrain.train.loop import CheckpointStore, TrainingDivergedError, check_losses


@pytest.mark.parametrize(
    ("iteration", "expected"),
    [(0, 0.001), (50, 0.5005), (100, 1.0), (299, 1.0), (300, 0.1), (370, 0.01), (399, 0.01)],
)
def test_lr_factor_follows_detectron2_warmup_multistep(iteration, expected):
    solver = solver_spec(filled("train", {"warmup_iterations": 100, "steps": [300, 370]}))
    assert lr_factor(solver, iteration) == pytest.approx(expected)


@pytest.mark.detectron2
def test_lr_factor_equals_detectron2s_scheduler():
    from detectron2.solver.lr_scheduler import WarmupParamScheduler  # noqa: F401
    from detectron2.solver.lr_scheduler import WarmupParamScheduler as Warmup
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    solver = solver_spec(filled("train", {"warmup_iterations": 100, "steps": [300, 370], "iterations": 400}))
    schedule = Warmup(
        MultiStepParamScheduler([1, 0.1, 0.01], milestones=[300, 370], num_updates=400),
        0.001,
        100 / 400,
        "linear",
        rescale_interval=False,
    )
    for iteration in (0, 10, 99, 100, 299, 300, 369, 370, 399):
        assert lr_factor(solver, iteration) == pytest.approx(schedule(iteration / 400), rel=1e-6)


def test_divergence_guard_names_the_iteration_and_the_losses():
    check_losses({"loss_a": 1.0}, 3, 100.0)
    with pytest.raises(TrainingDivergedError, match=r"iteration 7 \(loss_a=nan"):
        check_losses({"loss_a": float("nan")}, 7, 100.0)
    with pytest.raises(TrainingDivergedError):
        check_losses({"loss_a": 1e6}, 7, 100.0)


def test_checkpoints_resume_only_with_the_same_fingerprint_and_only_when_unfinished(tmp_path):
    store = CheckpointStore(tmp_path, "abc")
    store.start_fresh()
    store.save({"model": {"w": torch.ones(1)}}, 10)
    assert store.resumable() == (tmp_path / "model_0000010.pth", 10)
    assert CheckpointStore(tmp_path, "other").resumable() is None
    store.mark_finished(10)
    assert store.resumable() is None
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_engine_is_refused():
    with pytest.raises(D2RetrainError, match="unknown"):
        resolve_engine("caffe2")
    assert resolve_engine("auto", "maskrcnn_resnet50_fpn") == "torchvision"
