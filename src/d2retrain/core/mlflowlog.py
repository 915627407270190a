"""A training mirrored into an MLflow run (the `mlflow` extra), never at the cost of the training.

Every call goes through :class:`mlflow.MlflowClient` with the run's id, kept in a small state file
beside the run's checkpoints, so that a resumed training, and the jobs after it (evaluation),
continue the same run. Any failure of the tracking store is logged once as a warning and turns
tracking off for the rest of the process: requests get no retries and a short timeout, so a store
that is down costs seconds, not the training. Writes to a SQLite store are serialised between
processes by a lock file beside the database (two trainings side by side on one ``sqlite:`` URI).
"""

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from d2retrain.core.config import dotted_keys
from d2retrain.core.fileio import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["MlflowSettings", "MlflowRun", "flat_params", "git_commit", "mlflow_settings", "copy_run_state"]

STATE_FILE = "mlflow_run.json"
# Requests to a tracking server: no retries, a short timeout (MLflow's defaults retry for minutes).
_REQUEST_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
_FLUSH_EVERY = 50  # metric records
_FLUSH_SECONDS = 15.0
_LOCK_SECONDS = 30.0  # the longest wait for another job's write to a SQLite store


@dataclasses.dataclass(frozen=True)
class MlflowSettings:
    """Where and under which names a training is tracked.

    Attributes:
        tracking_uri: Any MLflow tracking URI (``sqlite:///results/mlflow.db``, ``http://host:5000``).
        experiment: The MLflow experiment's name.
        run_name: The run's name (``<subset>/<experiment>`` in the workflow).
        tags: Tags of the run (subset, experiment, package version, git commit...).
    """

    tracking_uri: str
    experiment: str
    run_name: str
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)


class MlflowRun:
    """One MLflow run, written through the client; every method is safe to call after a failure.

    Use :meth:`start` at the start of a training and :meth:`attach` in the jobs after it.
    """

    def __init__(self, tracking_uri: str, run_id: str | None) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client: Any = None
        self._pending: list[Any] = []
        self._flushed_at = time.monotonic()
        self._locked = False

    @classmethod
    def start(
        cls,
        settings: MlflowSettings,
        folder: str | os.PathLike[str],
        fingerprint: str,
        params: Mapping[str, Any],
        resuming: bool = False,
    ) -> "MlflowRun":
        """The run of a training whose checkpoints live in ``folder``: when ``resuming``, the one
        its state file names if it was started for the same ``fingerprint`` and store, else a new
        one with the settings' tags (and the fingerprint) and ``params``."""
        run = cls(settings.tracking_uri, None)
        state_file = Path(folder) / STATE_FILE
        state = _read_state(state_file)
        with run._guard("start"), run._store_lock():  # one process at a time creates the experiment
            client = run._connect()
            same = (
                state.get("fingerprint") == fingerprint and state.get("tracking_uri") == settings.tracking_uri
            )
            if resuming and same:
                run.run_id = state["run_id"]
                client.update_run(run.run_id, status="RUNNING")
                logger.info("MLflow: continuing run %s (%s)", run.run_id, settings.tracking_uri)
                return run
            experiment_id = run._experiment_id(settings.experiment)
            tags = {**settings.tags, "fingerprint": fingerprint}
            run.run_id = client.create_run(experiment_id, tags=tags, run_name=settings.run_name).info.run_id
            from mlflow.entities import Param

            run._batch(params=[Param(key, value) for key, value in flat_params(params).items()])
            write_text_atomic(
                state_file,
                json.dumps(
                    {"run_id": run.run_id, "tracking_uri": settings.tracking_uri, "fingerprint": fingerprint}
                ),
            )
            logger.info(
                "MLflow: run %s in experiment %s (%s)", run.run_id, settings.experiment, settings.tracking_uri
            )
        return run

    @classmethod
    def attach(cls, folder: str | os.PathLike[str], fingerprint: str | None = None) -> "MlflowRun | None":
        """The run a training with checkpoints in ``folder`` was tracked in (for ``fingerprint``,
        when given), or None when it was not."""
        state = _read_state(Path(folder) / STATE_FILE)
        if "run_id" not in state or fingerprint not in (None, state.get("fingerprint")):
            return None
        return cls(state["tracking_uri"], state["run_id"])

    def is_running(self) -> bool:
        """Whether the store has the run as RUNNING (False when it cannot be asked)."""
        if self.run_id is None:
            return False
        with self._guard("read the run"):
            return self._connect().get_run(self.run_id).info.status == "RUNNING"
        return False

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        """Queue a record's numbers as metrics at ``step``; sent in batches."""
        if self.run_id is None:
            return
        with self._guard("log metrics"):
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._pending += [
                Metric(key, float(value), now, step)
                for key, value in record.items()
                if key != "iteration" and isinstance(value, int | float) and not isinstance(value, bool)
            ]
        if len(self._pending) >= _FLUSH_EVERY or time.monotonic() - self._flushed_at > _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Send the queued metrics."""
        pending, self._pending = self._pending, []
        self._flushed_at = time.monotonic()
        if pending and self.run_id is not None:
            with self._guard("log metrics"):
                for first in range(0, len(pending), 1000):  # MLflow's batch limit
                    self._batch(metrics=pending[first : first + 1000])

    def log_artifacts(self, paths: Iterable[str | os.PathLike[str]], folder: str | None = None) -> None:
        """Upload files that exist to the run's artifacts (under ``folder``)."""
        if self.run_id is None:
            return
        for path in paths:
            if Path(path).is_file():
                with self._guard("log artifacts"), self._store_lock():
                    self._connect().log_artifact(self.run_id, str(path), folder)

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is queued and mark the run ended (``FINISHED`` or ``FAILED``)."""
        self.flush()
        if self.run_id is not None:
            with self._guard("end the run"), self._store_lock():
                self._connect().set_terminated(self.run_id, status)

    @property
    def _database(self) -> Path | None:
        """The database file of a SQLite store (None for other stores)."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        return Path(self.tracking_uri.removeprefix("sqlite:///"))

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, created when it does not exist (by this process or, on a server, by
        one racing it); a SQLite store's artifacts go beside its database (``mlflow-artifacts/``),
        not into the working folder."""
        client = self._connect()
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self._database is not None:
            location = (self._database.resolve().parent / "mlflow-artifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:
            experiment = client.get_experiment_by_name(name)  # created meanwhile by another job
            if experiment is None:
                raise
            return experiment.experiment_id

    def _batch(self, **entities: Any) -> None:
        with self._store_lock():
            self._connect().log_batch(self.run_id, **entities)

    def _connect(self) -> Any:
        if self._client is None:
            for key, value in _REQUEST_SETTINGS.items():
                os.environ.setdefault(key, value)
            from mlflow import MlflowClient

            with self._store_lock():  # a SQLite store creates its tables on first use
                self._client = MlflowClient(self.tracking_uri)
        return self._client

    @contextlib.contextmanager
    def _store_lock(self) -> Iterator[None]:
        """Between processes, one writer at a time to a SQLite store (a no-op for other stores)."""
        database = self._database
        if database is None or self._locked:  # held already: re-entered
            yield
            return
        database.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{database}.lock", "a") as handle:
            deadline = time.monotonic() + _LOCK_SECONDS
            while True:  # a holder that hangs must not hang the training: give up (the guard warns)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{database}.lock held for over {_LOCK_SECONDS:g} s") from None
                    time.sleep(0.05)
            self._locked = True
            try:
                yield
            finally:
                self._locked = False
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Turn a tracking failure into one warning, and tracking off for the rest of the process."""
        try:
            yield
        except Exception as error:
            logger.warning(
                "MLflow (%s): could not %s (%s: %s); training goes on without tracking",
                self.tracking_uri,
                doing,
                type(error).__name__,
                str(error).splitlines()[0][:200] if str(error) else "",
            )
            self.run_id = None
            self._pending = []


def copy_run_state(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make the checkpoint folder ``target`` name the MLflow run of ``source``'s, when it has one
    (a served copy of a variant's model: the jobs after it write to the variant's run)."""
    state = Path(source) / STATE_FILE
    if state.is_file():
        Path(target).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(target) / STATE_FILE, state.read_text())
    else:
        (Path(target) / STATE_FILE).unlink(missing_ok=True)


def flat_params(values: Mapping[str, Any]) -> dict[str, str]:
    """Nested settings as MLflow params: dotted keys, values as text (cut to MLflow's 6000 characters)."""
    return {
        key: (value if isinstance(value, str) else json.dumps(value))[:6000]
        for key, value in dotted_keys(values).items()
    }


def mlflow_settings(
    section: Mapping[str, Any], subset: str, experiment: str | None, repository: str | os.PathLike[str]
) -> MlflowSettings | None:
    """The settings of a workflow training from the config's ``mlflow`` section, or None when it
    sets no tracking URI.

    Args:
        section: ``mlflow`` (``tracking_uri``, ``experiment``).
        subset: The subset trained.
        experiment: The variant trained (None: the subset's one model).
        repository: The workflow's folder (its git commit becomes a tag when it is a repository).
    """
    from d2retrain import __version__  # the package need not be installed (conda jobs import src/)

    if not section.get("tracking_uri"):
        return None
    tags = {"subset": subset, "experiment": experiment or "", "d2retrain_version": __version__}
    commit = git_commit(repository)
    if commit:
        tags["git_commit"] = commit
    run_name = f"{subset}/{experiment}" if experiment else subset
    return MlflowSettings(section["tracking_uri"], section["experiment"], run_name, tags)


def git_commit(folder: str | os.PathLike[str]) -> str | None:
    """The commit checked out in ``folder``'s repository, or None outside one (an installed wheel)."""
    try:
        result = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
