"""Reliability drills: kills, a full disk, hostile names, long videos and two runs at once lose
nothing and corrupt nothing."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import pytest
import torch
import yaml
from conftest import COCO_MINI, REPO

D2RETRAIN = [sys.executable, "-m", "d2retrain.cli"]


def limited_file_size(limit: int):
    """A preexec_fn: files the child writes may not grow beyond ``limit`` bytes (ulimit -f)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes (``.<name>.*.tmp`` and ``.<name>.*.part``) in a folder tree."""
    return sorted(str(p) for p in folder.rglob(".*") if p.suffix in (".tmp", ".part"))


@pytest.mark.parametrize(
    ("command", "output"),
    [
        (["filter", "-c", "person", "sports ball", "-i", "{source}", "-o", "{out}/f.json"], "f.json"),
        (["masks", "-i", "{source}", "-o", "{out}/masks"], "masks"),
    ],
    ids=["filter", "masks"],
)
def test_a_full_disk_fails_with_a_no_space_message_and_leaves_no_partial_output(command, output, tmp_path):
    source = COCO_MINI / "annotations" / "instances_val2017.json"
    out = tmp_path / "out"
    out.mkdir()
    arguments = [part.format(source=source, out=out) for part in command]
    result = subprocess.run(
        [*D2RETRAIN, *arguments],
        capture_output=True,
        text=True,
        preexec_fn=limited_file_size(2048),  # the outputs need more; stderr is a pipe, not a file
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "no space left to write it (File too large)" in result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(out) == []
    target = out / output
    assert not target.exists() or (target.is_dir() and not any(target.glob("*.png"))), list(out.rglob("*"))


def workflow_config(tmp_path: Path, **sections) -> Path:
    """A config file for the demo workflow with small sections, in ``tmp_path``."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["demo"] = {"root": "resources/demo", "train_images": 8, "val_images": 4, "video_frames": 4}
    config["train"] = {"iterations": 4, "eval_period": 0, "checkpoint_period": 2}
    config.update(sections)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake_command(workdir: Path, config: Path, *args: str) -> list[str]:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    return [*command, "--configfile", str(config), "--cores", "2", *args]


@pytest.mark.slow
def test_a_second_snakemake_on_the_same_results_is_refused_with_the_lock_message(tmp_path):
    config = workflow_config(tmp_path, inference={"images": [], "videos": []})
    first = subprocess.Popen(
        snakemake_command(tmp_path, config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        lock = tmp_path / ".snakemake" / "locks"
        deadline = time.monotonic() + 120
        while not (lock.is_dir() and any(lock.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the second could start"
        second = subprocess.run(
            snakemake_command(tmp_path, config), capture_output=True, text=True, check=False
        )
        assert second.returncode != 0
        assert "Directory cannot be locked" in second.stdout + second.stderr
    finally:
        assert first.wait(timeout=600) == 0  # the first run is not disturbed
    check = subprocess.run(snakemake_command(tmp_path, config, "--dry-run"), capture_output=True, text=True)
    assert "Nothing to be done" in check.stdout + check.stderr
    assert json.loads((tmp_path / "results/person_ball/model/classes.json").read_text())["classes"]


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def metrics_lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_training_killed_with_sigkill_after_a_checkpoint_resumes_and_ends_at_the_configured_count(tmp_path):
    from d2retrain.filtering import FilterOptions
    from d2retrain.prepare import filter_file

    for split in ("train", "val"):
        source = COCO_MINI / "annotations" / f"instances_{split}2017.json"
        filter_file(str(source), str(tmp_path / f"{split}.json"), ["person", "sports ball"], FilterOptions())
    train = {
        "iterations": 12,
        "images_per_batch": 2,
        "checkpoint_period": 3,
        "eval_period": 0,
        "min_size_train": [128],
        "max_size_train": 200,
        "base_lr": 0.005,
        "device": "cpu",
    }
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"model": {"engine": "torchvision"}, "train": train})
    )
    model = tmp_path / "model"
    command = [*D2RETRAIN, "train", "-c", "person", "sports ball", "--config", str(tmp_path / "config.yaml")]
    command += ["--train-json", str(tmp_path / "train.json"), "--val-json", str(tmp_path / "val.json")]
    command += ["--train-images", str(COCO_MINI / "train2017"), "--val-images", str(COCO_MINI / "val2017")]
    command += ["-o", str(model), "--threads", "2"]
    kill_after = random.Random().randint(4, 10)  # logged iterations before the kill: 4..10
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        live = model / "checkpoints" / "metrics.jsonl"
        wait_for(lambda: metrics_lines(live) >= kill_after or first.poll() is not None, "training")
        first.send_signal(signal.SIGKILL)
        first.wait()
    state = json.loads((model / "checkpoints" / "state.json").read_text())
    assert state["iteration"] in (3, 6, 9) and not state["finished"], (kill_after, state)
    for checkpoint in (model / "checkpoints").glob("model_*.pth"):  # each loads whole
        assert set(torch.load(checkpoint, weights_only=True)) >= {"model", "optimizer"}, checkpoint
    assert not (model / "model_final.pth").exists()
    second = subprocess.run(command, capture_output=True, text=True, check=False)
    assert second.returncode == 0, second.stderr
    resumed = state["iteration"]
    assert f"model_{resumed:07d}.pth at iteration {resumed}" in second.stderr, (kill_after, second.stderr)
    lines = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == list(range(12)), kill_after
    assert json.loads((model / "checkpoints" / "state.json").read_text())["finished"]
    assert leftovers(model) == []  # a checkpoint write cut by the kill was cleaned up


def check_complete(folder: Path) -> int:
    """Every result file parses or decodes whole; returns how many were checked."""
    checked = 0
    for path in folder.rglob("*"):
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".png":
            assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is not None, path
        elif path.suffix == ".mp4":
            with av.open(str(path)) as container:
                assert sum(1 for _ in container.decode(video=0)) > 0, path
        checked += 1
    return checked


@pytest.mark.slow
@pytest.mark.parametrize(
    ("job", "started"),
    [
        ("filter", "logs/person_ball/filter_train.log"),
        ("images_and_masks", "results/person_ball/masks/train"),
        ("infer", "results/person_ball/inference/images"),
    ],
)
def test_a_workflow_killed_during_a_job_reruns_to_complete_outputs_and_none_is_ever_truncated(
    job, started, tmp_path
):
    config = workflow_config(
        tmp_path, inference={"images": ["resources/demo/val"], "videos": [], "shards": 1}
    )
    run = subprocess.Popen(
        snakemake_command(tmp_path, config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(lambda: (tmp_path / started).exists() or run.poll() is not None, f"the {job} job")
    if job != "filter":  # midway: some of the job's files written, not all
        wait_for(lambda: any((tmp_path / started).iterdir()) or run.poll() is not None, f"{job} output")
    assert run.poll() is None, f"the workflow ended before {job} could be killed"
    os.killpg(run.pid, signal.SIGKILL)  # snakemake and its job, as a node failure would
    run.wait()
    check_complete(tmp_path / "results")  # what the kill left: whole files, or hidden temporaries
    subprocess.run(snakemake_command(tmp_path, config, "--unlock"), capture_output=True, check=True)
    rerun = subprocess.run(
        snakemake_command(tmp_path, config, "--rerun-incomplete"), capture_output=True, text=True, check=False
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert check_complete(tmp_path / "results") > 10
    dry = subprocess.run(snakemake_command(tmp_path, config, "--dry-run"), capture_output=True, text=True)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    summary = (tmp_path / "results/person_ball/inference/summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 4 and all(",ok," in line for line in summary[1:])
