"""Engine-neutral training plumbing: resumable checkpoints, metrics log, divergence guard, plots."""

import contextlib
import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from d2retrain.core.errors import D2RetrainError
from d2retrain.core.fileio import atomic_open, remove_leftovers, write_figure
from d2retrain.core.mlflowlog import MlflowRun
from d2retrain.train.job import TrainJob, fingerprint
from d2retrain.train.progress import Progress

logger = logging.getLogger(__name__)

__all__ = [
    "BEST_METRIC",
    "TrainingDivergedError",
    "CheckpointStore",
    "MetricsLog",
    "check_losses",
    "loader_workers",
    "log_early_stop",
    "plot_metrics",
    "scalar_tag",
]


class TrainingDivergedError(D2RetrainError):
    """The loss became NaN, infinite or exploded."""


BEST_METRIC = "segm_AP"  # what "best" means: val mask AP, as detectron2 users pick models


class CheckpointStore:
    """Checkpoints of one training run, resumed only by a run with the same fingerprint.

    ``state.json`` records the fingerprint, the last checkpoint and whether the run
    finished. A finished run's checkpoints are not resumed: rerunning a finished
    training (``--forcerun``) starts fresh, a killed one continues.

    The best evaluation so far (:data:`BEST_METRIC`) keeps its weights in ``best_<iteration>.pth``
    and its record in :attr:`best`; each checkpoint writes that record into ``state.json``, so a
    resumed run goes on from the best of its checkpoint's past (a better evaluation after the
    last checkpoint is made again by the resumed run, which repeats those iterations).
    """

    def __init__(self, folder: str | Path, fingerprint: str, keep: int = 2) -> None:
        """Args:
        folder: Where checkpoints live.
        fingerprint: Hash of what shapes the model.
        keep: Checkpoints kept on disk.
        """
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.keep = keep
        self.best: dict[str, Any] | None = None  # {"iteration", "metric", "value", "file", "stale"}
        self.last_saved: int | None = None  # the iteration of this run's last checkpoint

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def resumable(self) -> tuple[Path, int] | None:
        """Return the checkpoint to resume and its iteration, or None to start fresh.

        Temporary files of a checkpoint write cut short by a kill are removed: only renamed,
        complete checkpoints are ever named by ``state.json``.
        """
        remove_leftovers(self.folder, lambda name: True)  # the folder holds only this store's files
        state = self._state()
        if not state:
            return None
        if state.get("fingerprint") != self.fingerprint:
            logger.info("checkpoints in %s belong to another configuration: starting fresh", self.folder)
            return None
        if state.get("finished"):
            logger.info("the previous run in %s finished: starting fresh", self.folder)
            return None
        path = self.folder / state["checkpoint"]
        if not path.is_file():
            return None
        self.best = state.get("best")
        self._prune_best()
        return path, int(state["iteration"])

    def latest(self) -> Path:
        """The checkpoint ``state.json`` points at (the final one after a finished run).

        Raises:
            D2RetrainError: No checkpoint was recorded.
        """
        state = self._state()
        if "checkpoint" not in state:
            raise D2RetrainError(f"{self.folder}: no checkpoint recorded in state.json")
        return self.folder / state["checkpoint"]

    def start_fresh(self) -> None:
        """Remove old checkpoints and state."""
        self.best = None
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)

    def save(self, payload: dict[str, Any], iteration: int) -> Path:
        """Write a checkpoint durably, then point ``state.json`` at it.

        Args:
            payload: What to save (tensors and plain values only).
            iteration: Iterations completed.

        Returns:
            The checkpoint's path.
        """
        path = self.folder / f"model_{iteration:07d}.pth"
        with atomic_open(path, durable=True) as handle:
            torch.save(payload, handle)
        self._write_state(
            {"checkpoint": path.name, "iteration": iteration, "finished": False, "best": self.best}
        )
        self.last_saved = iteration
        for old in sorted(self.folder.glob("model_*.pth"))[: -self.keep]:
            old.unlink()
        self._prune_best()
        logger.info("checkpoint at iteration %d: %s", iteration, path)
        return path

    def mark_finished(self, iteration: int) -> None:
        """Record that the run completed, so a rerun starts fresh."""
        state = self._state()
        self._write_state({**state, "iteration": iteration, "finished": True, "best": self.best})

    def record_evaluation(
        self, record: dict[str, Any], weights: dict[str, torch.Tensor], patience: int
    ) -> bool:
        """Keep ``weights`` as the best when ``record`` (an evaluation during training) is better
        than every one before, and say whether training should stop.

        Args:
            record: ``{"iteration", BEST_METRIC, ...}`` as written to ``metrics.jsonl``.
            weights: The network's state dict at that iteration.
            patience: Evaluations without improvement after which to stop (0: never).

        Returns:
            Whether ``patience`` evaluations in a row have not improved on the best.
        """
        value = float(record[BEST_METRIC])
        iteration = int(record["iteration"])
        if self.best is None or value > self.best["value"]:
            self.keep_best(weights, iteration, value)
        return self.count_evaluation(iteration, patience)

    def keep_best(self, weights: dict[str, torch.Tensor], iteration: int, value: float) -> None:
        """Write ``weights`` as the best so far (``best_<iteration>.pth``), evaluated at ``iteration``
        (iterations done) to ``value`` of :data:`BEST_METRIC`."""
        path = self.folder / f"best_{iteration:07d}.pth"
        with atomic_open(path, durable=True) as handle:
            torch.save({"model": weights}, handle)
        self.best = {
            "iteration": iteration,
            "metric": BEST_METRIC,
            "value": value,
            "file": path.name,
            "stale": 0,
        }
        self._prune_best()
        logger.info("best so far: %s %.4f at iteration %d", BEST_METRIC, value, iteration)

    def count_evaluation(self, iteration: int, patience: int) -> bool:
        """Count an evaluation at ``iteration`` that did not beat the best (one that did is the
        best's own), and say whether ``patience`` evaluations in a row have not improved (0: never)."""
        if self.best is not None and self.best["iteration"] != iteration:
            self.best["stale"] += 1
        return patience > 0 and self.best is not None and self.best["stale"] >= patience

    def finished_run(self) -> int:
        """Load the best record ``state.json`` holds into :attr:`best` (after a finished run) and
        return the iterations done."""
        state = self._state()
        self.best = state.get("best")
        return int(state["iteration"])

    def best_weights(self) -> Path | None:
        """The best evaluation's weights, or None when there was no evaluation."""
        return None if self.best is None else self.folder / self.best["file"]

    def _prune_best(self) -> None:
        """Remove best weights that neither the run nor ``state.json`` refers to."""
        wanted = {(self.best or {}).get("file"), (self._state().get("best") or {}).get("file")}
        for path in self.folder.glob("best_*.pth"):
            if path.name not in wanted:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _write_state(self, state: dict[str, Any]) -> None:
        text = json.dumps({"fingerprint": self.fingerprint, **state}, indent=2)
        with atomic_open(self.folder / "state.json", durable=True) as handle:
            handle.write(text.encode())


class MetricsLog:
    """``metrics.jsonl``: one line per logged iteration, kept consistent across resumes, and the same
    scalars as TensorBoard event files (``tensorboard --logdir results``).

    The event folder is rewritten from the kept lines when a log opens, so that it always shows
    exactly ``metrics.jsonl``: a resumed run's repeated iterations appear once.
    """

    def __init__(
        self,
        path: str | Path,
        resume_from: int,
        tensorboard: str | Path | None = None,
        progress: Progress | None = None,
        tracker: MlflowRun | None = None,
    ) -> None:
        """Args:
        path: The live log (in the checkpoint folder).
        resume_from: Keep only the lines of the iterations up to this count (those the resumed
            checkpoint holds; records count iterations done, 1 for the first).
        tensorboard: Folder of the event files (emptied first); None: no event files.
        progress: Progress lines in the job log (None: none).
        tracker: The MLflow run the records also go to (None: none).
        """
        self.path = Path(path)
        self.progress = progress
        self.tracker = tracker
        kept = []
        if resume_from > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["iteration"] <= resume_from:
                        kept.append(line)
                except (ValueError, KeyError):
                    break  # a line cut by a kill ends the usable log
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(f"{line}\n" for line in kept))
        self._handle = self.path.open("a")
        self._events = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            shutil.rmtree(tensorboard, ignore_errors=True)
            self._events = SummaryWriter(str(tensorboard), flush_secs=10)
            for line in kept:
                self._add_scalars(json.loads(line))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it."""
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        self._add_scalars(record)
        if self.progress is not None:
            self.progress.record(record)
        if self.tracker is not None:
            self.tracker.log_metrics(record, record["iteration"])
            if any(key.endswith("_AP") for key in record):  # an evaluation: seen at once
                self.tracker.flush()

    @classmethod
    def of(cls, job: TrainJob, resume_from: int) -> "MetricsLog":
        """The log of a training job: its live metrics, TensorBoard events, progress lines, and its
        MLflow run when ``job.mlflow`` is set (continued when the training resumes)."""
        tracker = None
        if job.mlflow is not None:
            params: dict[str, Any] = {
                "model": dataclasses.asdict(job.model),
                "solver": dataclasses.asdict(job.solver),
                "classes": list(job.classes),
            }
            resuming = resume_from > 0
            tracker = MlflowRun.start(job.mlflow, job.checkpoint_dir, fingerprint(job), params, resuming)
        return cls(
            job.folder.live_metrics, resume_from, job.tensorboard_dir, Progress.of(job.solver), tracker
        )

    def _add_scalars(self, record: dict[str, Any]) -> None:
        if self._events is None:
            return
        for key, value in record.items():
            if key != "iteration" and isinstance(value, int | float):
                self._events.add_scalar(scalar_tag(key), value, record["iteration"])

    def close(self) -> None:
        """Close the log and the event files; send what the MLflow run has queued."""
        self._handle.close()
        if self.tracker is not None:
            self.tracker.flush()
        if self._events is not None:
            self._events.close()


def scalar_tag(key: str) -> str:
    """TensorBoard tag of a ``metrics.jsonl`` key: losses, val AP and times in their own sections."""
    if key.startswith("loss") or key == "total_loss":
        return f"loss/{key}"
    if "AP" in key:
        return f"val/{key}"
    if key == "time":
        return "time/iteration"
    return f"time/{key}" if key.endswith("time") else key


def log_early_stop(store: CheckpointStore, iteration: int) -> None:
    """Say why training stops before its configured length (``train.patience``)."""
    best = store.best or {}
    logger.info(
        "stopping early after iteration %d: %d evaluations without a better %s than %.4f at iteration %s",
        iteration,
        best.get("stale", 0),
        BEST_METRIC,
        best.get("value", float("nan")),
        best.get("iteration"),
    )


def loader_workers(threads: int) -> int:
    """Data-loading processes for a job with ``threads`` CPUs: none on small machines, where a
    worker only takes a core from the model, else a quarter of the threads (at most 4)."""
    return 0 if threads <= 2 else min(4, threads // 4 or 1)


def check_losses(losses: dict[str, float], iteration: int, max_loss: float) -> None:
    """Stop training on a NaN, infinite or exploding loss.

    Raises:
        TrainingDivergedError: With the iteration, the offending losses and what to try.
    """
    total = sum(losses.values())
    if math.isfinite(total) and total <= max_loss:
        return
    shown = ", ".join(f"{name}={value:.4g}" for name, value in losses.items())
    raise TrainingDivergedError(
        f"training diverged at iteration {iteration} ({shown}); the last good checkpoint is kept. "
        "Lower train.base_lr or lengthen train.warmup_iterations, then rerun"
    )


def plot_metrics(metrics_path: str | Path, png_path: str | Path, title: str) -> None:
    """Plot total and component losses, the learning rate and, when training evaluated the val
    split, its AP against iterations.

    Args:
        metrics_path: A ``metrics.jsonl`` (loss records, and AP records from ``train.eval_period``).
        png_path: The PNG to write.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [r for r in records if "total_loss" in r]
    evals = [r for r in records if "segm_AP" in r]
    figure, axes = plt.subplots(1, 3 if evals else 2, figsize=(16 if evals else 11, 3.8))
    losses, rate = axes[0], axes[1]
    iterations = [r["iteration"] for r in steps]
    for key in sorted({k for r in steps for k in r if k.startswith("loss") or k == "total_loss"}):
        losses.plot(
            iterations,
            [r.get(key, float("nan")) for r in steps],
            label=key,
            linewidth=2 if key == "total_loss" else 1,
        )
    losses.set_yscale("log")
    losses.set_xlabel("iteration")
    losses.set_title("losses")
    losses.legend(fontsize=7)
    rate.plot(iterations, [r["lr"] for r in steps])
    rate.set_xlabel("iteration")
    rate.set_title("learning rate")
    if evals:
        for key in ("bbox_AP", "segm_AP"):
            axes[2].plot([r["iteration"] for r in evals], [r[key] for r in evals], marker="o", label=key)
        axes[2].set_xlabel("iteration")
        axes[2].set_title("val AP during training")
        axes[2].legend(fontsize=7)
    write_figure(png_path, figure, title)
