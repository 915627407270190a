"""Training progress lines: iteration, losses, rate, data time, time left, evaluations and the best."""

import logging

from d2retrain.train import progress as progress_module
from d2retrain.train.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def steps(progress: Progress, clock: Clock, first: int, last: int, seconds: float = 0.5) -> None:
    for index in range(first, last):
        clock.now += seconds
        record = {"iteration": index + 1, "total_loss": 2.0, "loss_mask": 0.5, "lr": 0.02, "data_time": 0.01}
        progress.record(record | {"time": seconds})


def test_lines_every_20_iterations_with_the_time_left_and_one_per_evaluation(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    progress = Progress(total=100, eval_period=50)
    with caplog.at_level(logging.INFO, logger="d2retrain.train.progress"):
        steps(progress, clock, 0, 50)
        clock.now += 12.0  # the evaluation
        progress.record({"iteration": 50, "segm_AP": 0.4, "bbox_AP": 0.3})
        steps(progress, clock, 50, 60)
        clock.now += 12.0
        progress.record({"iteration": 60, "segm_AP": 0.35, "bbox_AP": 0.3})  # not the best
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split()[1] for line in lines if line.startswith("iteration")] == [
        "20/100",
        "40/100",
        "60/100",
    ]
    assert "loss_mask: 0.5" in lines[0] and "lr: 0.02" in lines[0] and "0.500 s/it" in lines[0]
    assert "data: 0.010 s" in lines[0]
    assert lines[0].endswith(
        "eta: 0:00:40 + 2 evaluation(s)"
    )  # 80 iterations x 0.5 s, evaluations not timed yet
    evaluation = "evaluation at iteration 50/100: segm AP 0.4000, bbox AP 0.3000 (12 s); best so far: segm AP"
    assert lines[2] == f"{evaluation} 0.4000 at iteration 50"
    assert lines[3].endswith("eta: 0:00:32")  # 40 iterations x 0.5 s + 1 evaluation x 12 s
    assert lines[4].endswith("best so far: segm AP 0.4000 at iteration 50")


def test_a_slow_training_still_logs_every_30_seconds_and_the_last_iteration(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    progress = Progress(total=7, eval_period=0)
    with caplog.at_level(logging.INFO, logger="d2retrain.train.progress"):
        steps(progress, clock, 0, 7, seconds=11.0)
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split()[1] for line in lines] == ["3/7", "6/7", "7/7"]  # every 33 s, then the end
    assert "eta: 0:00:44" in lines[0] and lines[-1].endswith("eta: 0:00:00")
