"""Trainings tracked in MLflow: a real tracking server read back with MlflowClient, a resumed training
continuing its run, and a server that is down sparing the training."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers.training import kill_during_step, train_mini

from d2retrain.core.mlflowlog import MlflowSettings

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += [
        "--backend-store-uri",
        f"sqlite:///{folder}/store.db",
        "--artifacts-destination",
        str(folder / "art"),
    ]
    environment = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: tracking only
    server = subprocess.Popen(
        [*command, "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(30)


def test_a_killed_training_resumes_into_the_same_run_with_params_metrics_and_artifacts(
    mini_split, tmp_path, monkeypatch, tracking_server
):
    folder, paths = mini_split
    settings = MlflowSettings(
        tracking_server, "d2retrain-tests", "mini/base", {"subset": "mini", "experiment": "base"}
    )
    revive = kill_during_step(monkeypatch, 4)  # killed during iteration 3, after the checkpoint at 2
    with pytest.raises(KeyboardInterrupt):
        train_mini(folder, paths, tmp_path / "model", mlflow=settings)
    client = mlflow.MlflowClient(tracking_server)
    experiment = client.get_experiment_by_name("d2retrain-tests")
    (killed,) = client.search_runs([experiment.experiment_id])
    assert killed.info.status == "FAILED"  # what was logged before the kill is kept
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "lr")] == [1, 2, 3]

    revive()
    train_mini(folder, paths, tmp_path / "model", mlflow=settings)
    (run,) = client.search_runs([experiment.experiment_id])  # the same run, continued
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "mini/base" and run.data.tags["experiment"] == "base"
    assert (
        run.data.tags["fingerprint"]
        == json.loads((tmp_path / "model/classes.json").read_text())["fingerprint"]
    )
    assert (
        run.data.params["solver.base_lr"] == "0.005"
        and run.data.params["model.architecture"] == "maskrcnn_resnet18_fpn"
    )
    lines = [json.loads(line) for line in (tmp_path / "model/metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run.info.run_id, "total_loss")
    assert [m.step for m in history] == [1, 2, 3, 3, 4]  # iteration 3 again after the resume from 2
    last = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}  # the latest of each step
    assert last == {
        line["iteration"]: pytest.approx(line["total_loss"]) for line in lines if "total_loss" in line
    }
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "metrics.jsonl",
        "loss.png",
        "config.yaml",
        "best.json",
    }  # fmt: skip (val AP by iteration, evaluations and the card: tests/workflow/test_experiments.py)


def test_a_tracking_server_that_is_down_warns_once_and_the_training_goes_on(mini_split, tmp_path, caplog):
    folder, paths = mini_split
    settings = MlflowSettings(f"http://127.0.0.1:{free_port()}", "d2retrain", "down", {})  # nothing listens
    with caplog.at_level(logging.WARNING):
        train_mini(folder, paths, tmp_path / "model", iterations=1, steps=[], mlflow=settings)
    assert (tmp_path / "model/model_final.pth").is_file()
    warnings = [r.getMessage() for r in caplog.records if "MLflow" in r.getMessage()]
    assert len(warnings) == 1 and "could not start" in warnings[0], warnings  # once, then no more tries
    assert "training goes on without tracking" in warnings[0]
    assert not (tmp_path / "model/checkpoints/mlflow_run.json").exists()  # later jobs do not try either
