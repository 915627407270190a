"""Training progress in the job log and on the console, as detectron2 prints it: every few
iterations the losses, learning rate, seconds per iteration, data time and the time left."""

import collections
import datetime
import logging
import statistics
import time
from typing import Any

from d2retrain.model.specs import SolverSpec

logger = logging.getLogger(__name__)

__all__ = ["Progress"]


class Progress:
    """Writes a progress line every ``every`` iterations and at least every ``seconds``, and one
    line per evaluation with its AP and the best so far.

    The time left counts the iterations to go at the median seconds per iteration of the last 20,
    and the evaluations to come at the duration of the last one (before the first, it says how many
    are still to come).
    """

    def __init__(self, total: int, eval_period: int, every: int = 20, seconds: float = 30.0) -> None:
        """Args:
        total: Iterations of the whole training.
        eval_period: Iterations between evaluations (0: none).
        every: Iterations between lines.
        seconds: Most seconds between lines.
        """
        self.total, self.eval_period, self.every, self.seconds = total, eval_period, every, seconds
        self.times: collections.deque[float] = collections.deque(maxlen=20)
        self.data_times: collections.deque[float] = collections.deque(maxlen=20)
        self.last_line = self.last_record = time.monotonic()
        self.eval_seconds: float | None = None
        self.best: tuple[float, int] | None = None

    @classmethod
    def of(cls, solver: SolverSpec) -> "Progress":
        """The progress of a training with these solver settings (``iterations``, ``eval_period``)."""
        return cls(solver.iterations, solver.eval_period)

    def record(self, record: dict[str, Any]) -> None:
        """Take one ``metrics.jsonl`` record (an iteration's losses or an evaluation's AP)."""
        now, since = time.monotonic(), time.monotonic() - self.last_record
        self.last_record = now
        if "segm_AP" in record:
            self._evaluation(record, since)
        elif "total_loss" in record:
            self._iteration(record, now)

    def _iteration(self, record: dict[str, Any], now: float) -> None:
        self.times.append(float(record.get("time", 0.0)))
        self.data_times.append(float(record.get("data_time", 0.0)))
        done = int(record["iteration"])  # iterations done
        if done % self.every and now - self.last_line < self.seconds and done != self.total:
            return
        self.last_line = now
        per_iteration = statistics.median(self.times)
        losses = "  ".join(f"{k}: {v:.4g}" for k, v in record.items() if k.startswith("loss_"))
        logger.info(
            "iteration %d/%d  total_loss: %.4g  %s  lr: %.3g  %.3f s/it  data: %.3f s  eta: %s",
            done,
            self.total,
            record["total_loss"],
            losses,
            record.get("lr", 0.0),
            per_iteration,
            statistics.median(self.data_times),
            self._eta(done, per_iteration),
        )

    def _eta(self, done: int, per_iteration: float) -> str:
        seconds = (self.total - done) * per_iteration
        evaluations = self.total // self.eval_period - done // self.eval_period if self.eval_period else 0
        if self.eval_seconds is not None:
            seconds += evaluations * self.eval_seconds
        left = str(datetime.timedelta(seconds=round(seconds)))
        if evaluations and self.eval_seconds is None:
            return f"{left} + {evaluations} evaluation(s)"
        return left

    def _evaluation(self, record: dict[str, Any], seconds: float) -> None:
        self.eval_seconds = seconds
        value, iteration = float(record["segm_AP"]), int(record["iteration"])
        if self.best is None or value > self.best[0]:
            self.best = (value, iteration)
        logger.info(
            "evaluation at iteration %d/%d: segm AP %.4f, bbox AP %.4f (%.0f s); best so far: segm AP %.4f "
            "at iteration %d",
            iteration,
            self.total,
            value,
            float(record.get("bbox_AP", 0.0)),
            seconds,
            *self.best,
        )
