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
import numpy as np
import pytest
import torch
import yaml
from helpers import COCO_MINI, REPO, filled

from d2retrain.infer.inputs import InputFile
from d2retrain.infer.pipeline import Labels, infer_video, inference_options
from d2retrain.model.instances import Instances

D2RETRAIN = [sys.executable, "-m", "d2retrain.cli"]


def limited_file_size(limit: int):
    """A preexec_fn: files the child writes may not grow beyond ``limit`` bytes (ulimit -f)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes (``.<name>.*.tmp``) in a folder tree."""
    return sorted(str(p) for p in folder.rglob(".*.tmp"))


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
    config = workflow_config(
        tmp_path,
        inference={"images": [], "videos": []},
        train={"iterations": 20, "eval_period": 0, "checkpoint_period": 10},
    )
    target = "results/person_ball/model/model_final.pth"  # up to training: the runs meet there
    first = subprocess.Popen(
        snakemake_command(tmp_path, config, target), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        lock = tmp_path / ".snakemake" / "locks"
        deadline = time.monotonic() + 120
        while not (lock.is_dir() and any(lock.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the second could start"
        # Snakemake checks for incomplete outputs before it takes the lock: while a job of the first
        # run is writing, a plain second run stops on that job's incomplete marker instead.
        second = subprocess.run(
            snakemake_command(tmp_path, config, target), capture_output=True, text=True, check=False
        )
        assert second.returncode != 0
        said = second.stdout + second.stderr
        assert "Directory cannot be locked" in said or "IncompleteFilesException" in said, said
        # Told to rerun incomplete jobs, the second run reaches the lock and is refused there.
        third = subprocess.run(
            snakemake_command(tmp_path, config, target, "--rerun-incomplete"),
            capture_output=True,
            text=True,
            check=False,
        )
        assert first.poll() is None, "the first run ended before the third run was refused"
        assert third.returncode != 0
        assert "Directory cannot be locked" in third.stdout + third.stderr, third.stdout + third.stderr
    finally:
        assert first.wait(timeout=600) == 0  # the first run is not disturbed
    check = subprocess.run(
        snakemake_command(tmp_path, config, target, "--dry-run"), capture_output=True, text=True
    )
    assert "Nothing to be done" in check.stdout + check.stderr, check.stdout + check.stderr
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
    from d2retrain.data.filtering import FilterOptions
    from d2retrain.data.prepare import filter_file

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
    assert not (model / "model_final.pth").exists() and not (model / "model.pth").exists()
    second = subprocess.run(command, capture_output=True, text=True, check=False)
    assert second.returncode == 0, second.stderr
    resumed = state["iteration"]
    assert f"model_{resumed:07d}.pth at iteration {resumed}" in second.stderr, (kill_after, second.stderr)
    lines = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == list(range(1, 13)), kill_after
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
    if job == "infer":  # the temporaries a killed inference left are gone with its rerun
        assert leftovers(tmp_path / "results" / "person_ball" / "inference") == []
    dry = subprocess.run(snakemake_command(tmp_path, config, "--dry-run"), capture_output=True, text=True)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    summary = (tmp_path / "results/person_ball/inference/summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 4 and all(",ok," in line for line in summary[1:])


def resident_kib() -> int:
    """This process's resident memory (VmRSS), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


class MovingInstances:
    """A predictor double that finds two instances per frame (a box and a disc that move), so
    that drawing, RLE and JSONL work as with a model, and notes memory at chosen frame counts.
    The streaming pipeline under test is real; only the network is replaced, to keep 5,000
    frames affordable on 2 cores."""

    def __init__(self, marks: tuple[int, ...]) -> None:
        self.frames = 0
        self.marks = marks
        self.resident: dict[int, int] = {}

    def __call__(self, image):
        return self.predict_batch([image])[0]

    def predict_batch(self, images):
        results = []
        for image in images:
            height, width = image.shape[:2]
            x = self.frames % (width - 20)
            masks = np.zeros((2, height, width), bool)
            masks[0, 5:25, x : x + 20] = True
            cv2.circle(masks[1].view(np.uint8), (width - 1 - x, height // 2), 8, 1, -1)
            boxes = np.array(
                [[x, 5, x + 20, 25], [width - 9 - x, height // 2 - 8, width + 7 - x, height // 2 + 8]]
            )
            results.append(Instances(boxes.astype(np.float32), np.array([0.9, 0.8]), np.array([0, 1]), masks))
            self.frames += 1
            if self.frames in self.marks:
                self.resident[self.frames] = resident_kib()
        return results


def write_long_video(path: Path, frames: int, width: int = 96, height: int = 64) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        base = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
        for index in range(frames):
            picture = av.VideoFrame.from_ndarray(np.roll(base, index, axis=1), format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())


@pytest.mark.slow
def test_a_long_video_streams_in_flat_memory(tmp_path):
    """5,000 frames inferred and tracked: the frames, the masks and the tracker's state are not kept."""
    write_long_video(tmp_path / "long.mp4", 5000)
    predictor = MovingInstances(marks=(200, 5000))
    options = inference_options(filled("inference", {"device": "cpu", "track": True, "trail_frames": 10}))
    labels = Labels(("person", "sports ball"), (1, 37))
    status = infer_video(
        predictor, labels, InputFile.of(tmp_path / "long.mp4", "video"), tmp_path / "out", options
    )
    assert (status.status, status.frames, status.instances) == ("ok", 5000, 10000)
    after_200, after_5000 = predictor.resident[200], predictor.resident[5000]
    assert after_5000 <= 1.2 * after_200, (
        f"resident memory {after_200} KiB after 200 frames, {after_5000} after 5000"
    )
    assert len((tmp_path / "out" / "long.jsonl").read_text().splitlines()) == 5000
    with av.open(str(tmp_path / "out" / "long.mp4")) as container:
        assert container.streams.video[0].frames == 5000
    # every instance is in a track: a new one each time the box wraps around to the left side
    assert len((tmp_path / "out" / "long.tracks.csv").read_text().splitlines()) == 10000
    tracks = json.loads((tmp_path / "out" / "long.tracks.json").read_text())["tracks"]
    assert sum(track["length"] for track in tracks) == 10000 and len(tracks) > 60


HOSTILE_NAMES = [
    'it\'s a "quote"',
    "$(touch PWNED)",
    "`touch PWNED`",
    "ünïcödé 写真 photo",
    "semi;colon & amp |pipe",
]


def rename_images(annotations: Path, folder: Path, names: list[str]) -> list[str]:
    """Give the first images of a demo split hostile names, on disk and in the annotations."""
    document = json.loads(annotations.read_text())
    for image, name in zip(document["images"], names, strict=False):
        new = f"{name}.jpg"
        (folder / image["file_name"]).rename(folder / new)
        image["file_name"] = new
    annotations.write_text(json.dumps(document))
    return [f"{name}.jpg" for name in names[: len(document["images"])]]


@pytest.mark.slow
def test_file_names_with_quotes_dollars_backticks_and_unicode_flow_through_every_rule(tmp_path):
    from d2retrain.data.demo import write_demo_dataset

    layout = write_demo_dataset(tmp_path / "data", train=8, val=6, video_frames=4)
    for split in ("train", "val"):
        rename_images(layout.annotations(split), layout.images(split), HOSTILE_NAMES)
    video = layout.video.with_name("clip $(touch PWNED) 'x'.mp4")
    layout.video.rename(video)
    dataset = {
        split: {"images": str(layout.images(split)), "annotations": str(layout.annotations(split))}
        for split in ("train", "val")
    }
    config = workflow_config(
        tmp_path,
        datasets={"hostile": dataset},
        subsets={
            "person_ball": {"dataset": "hostile", "categories": ["person", "sports ball"], "masks": True}
        },
        inference={"images": [str(layout.images("val"))], "videos": [str(video)], "shards": 2},
    )
    run = subprocess.run(snakemake_command(tmp_path, config), capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()  # nothing ran through a shell
    results = tmp_path / "results" / "person_ball"
    kept = {image["file_name"] for image in json.loads((results / "data/val.json").read_text())["images"]}
    for name in HOSTILE_NAMES:
        if f"{name}.jpg" in kept:  # kept by the filter: masks and an image link under its own name
            assert (results / "masks" / "val" / f"{name}_semantic.png").is_file(), name
            assert (results / "images" / "val" / f"{name}.jpg").is_file(), name
        drawn = results / "inference" / "images"
        assert json.loads((drawn / f"{name}.json").read_text())["status"] == "ok", name
        assert cv2.imread(str(drawn / f"{name}.png")) is not None, name
    assert (results / "inference" / "videos" / "clip $(touch PWNED) 'x'.mp4").is_file()
    dry = subprocess.run(snakemake_command(tmp_path, config, "--dry-run"), capture_output=True, text=True)
    assert "Nothing to be done" in dry.stdout + dry.stderr


@pytest.mark.slow
def test_an_inference_file_with_braces_is_refused_by_name_before_any_job(tmp_path):
    """Snakemake reads braces in paths as wildcards, with no escape: a clear error, not a wrong job."""
    images = tmp_path / "photos"
    images.mkdir()
    cv2.imwrite(str(images / "ok.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(images / "x {subset}.png"), np.zeros((8, 8, 3), np.uint8))
    config = workflow_config(tmp_path, inference={"images": [str(images)], "videos": []})
    dry = subprocess.run(snakemake_command(tmp_path, config, "--dry-run"), capture_output=True, text=True)
    assert dry.returncode != 0
    assert "1 file(s) with { or } in their path" in dry.stdout + dry.stderr
    assert "x {subset}.png; rename them, or infer them with `d2retrain infer`" in dry.stdout + dry.stderr
