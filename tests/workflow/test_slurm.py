"""The workflow on a real one-node SLURM cluster through profiles/slurm: the results of a local
run, every job a SLURM job with the profile's resources, and a training killed at its time limit
resuming on the next run."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import DEMO_DATASET, REPO
from helpers.slurm_cluster import (
    ACCOUNT,
    CPU_PARTITION,
    CPUS,
    GPU_PARTITION,
    GPUS,
    SlurmCluster,
    install_packages,
    running_cluster,
    unmet_needs,
)

pytestmark = pytest.mark.slow

PROFILE = REPO / "profiles" / "slurm"
SUBSET = "person_ball"
CONFIG = {
    "demo": {"train_images": 12, "val_images": 4, "video_frames": 4},
    "datasets": {"demo": DEMO_DATASET},
    "subsets": {SUBSET: {"dataset": "demo", "categories": ["person", "sports ball"], "masks": True}},
    "train": {"iterations": 6, "eval_period": 3, "checkpoint_period": 3, "warmup_iterations": 2, "steps": []},
    # A low threshold, so that the barely trained model's detections are compared too.
    "inference": {
        "images": ["resources/demo/val"],
        "videos": ["resources/demo/video/demo.mp4"],
        "shards": 2,
        "score_threshold": 0.05,
    },
    "cluster": {"partition": CPU_PARTITION, "gpu_partition": GPU_PARTITION, "account": ACCOUNT},
}
GPU_RULES = {"train", "evaluate", "infer_00", "infer_01"}
DATA_RULES = {"demo_data", "filter", "balance", "images_and_masks", "stats", "inference_summary"}
# The result files that time the work (seconds per iteration, per inferred file), and those fields.
EVENTS = "model/tensorboard/events"  # TensorBoard names its file by wall time, host and process
TIMED = {
    "model/metrics.jsonl",
    "model/checkpoints/metrics.jsonl",
    "inference/summary.csv",
    EVENTS,
    "model/MODEL_CARD.md",  # "N min of iterations"
    "model/model_card.html",
}
# the shards' statuses, and the records beside each inferred file's outputs (its input's mtime too)
TIMED_PATTERNS = ("inference/status/shard_*.json", "inference/*/.*.record.json")
TIMINGS = {"time", "data_time", "seconds", "mtime_ns"}
# ENCODED: a drawn MP4 of the SLURM run may differ in bytes from the local run's though its JSONL
# (every prediction, masks as RLE) is byte-identical and a drawn image's PNG is too: 2 of the 4
# frames of the busy 0.05-threshold video came out differently encoded in 1 run of 3 (x264's
# thread count is fixed, and re-encoding the same frames locally is repeatable under load or with
# one CPU; the cause in the SLURM job is not found). So the decoded pictures are compared: same
# count and size, within 2 grey levels on average.


def same_pictures(first: Path, second: Path) -> bool:
    import av

    def pictures(path: Path) -> list:
        with av.open(str(path)) as container:
            return [frame.to_ndarray(format="bgr24").astype(int) for frame in container.decode(video=0)]

    ours, theirs = pictures(first), pictures(second)
    return len(ours) == len(theirs) and all(
        a.shape == b.shape and abs(a - b).mean() <= 2 for a, b in zip(ours, theirs, strict=True)
    )


# Status checks from 1 s after a submission instead of the plugin's 40 s (it then waits 10 s
# longer after each check that finds no job done, so a short job is seen done after 12 s).
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1")
RESUMABLE_TRAINING = {"iterations": 30, "checkpoint_period": 5, "eval_period": 0}


def snakemake_command(workdir: Path, config: dict, *args: str) -> list[str]:
    """Write ``config`` into ``workdir``; return the command running snakemake on it there, with
    ``--max-threads`` equal to the node's CPUs."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    return [*command, "--configfile", str(workdir / "config.yaml"), "--max-threads", str(CPUS), *args]


def snakemake(
    workdir: Path, config: dict, *args: str, environment: dict | None = None
) -> subprocess.CompletedProcess:
    """Run snakemake on ``config`` with ``workdir`` as its working directory too (as on a
    cluster's login node); return the finished process."""
    command = snakemake_command(workdir, config, *args)
    return subprocess.run(command, cwd=workdir, env=environment, capture_output=True, text=True, check=False)


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def slurm_options(profile: Path) -> tuple[str, ...]:
    return ("--workflow-profile", str(profile), *FAST_POLLING)


def through_slurm(
    cluster: SlurmCluster, workdir: Path, config: dict, *args: str, profile: Path = PROFILE
) -> subprocess.CompletedProcess:
    """Run snakemake with the workflow profile ``profile`` (executor: slurm) on the cluster."""
    return snakemake(workdir, config, *slurm_options(profile), *args, environment=cluster.environment)


def untimed(path: Path) -> object:
    """A JSON, JSONL, CSV, model card or TensorBoard event file's content without what times the work."""
    if path.suffix in (".md", ".html"):
        return re.sub(r"[\d.]+ min of iterations", "_ min of iterations", path.read_text())
    if path.name.startswith("events.out.tfevents."):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        tags = [tag for tag in events.Tags()["scalars"] if not tag.startswith("time/")]
        return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in tags}
    if path.suffix == ".jsonl":
        return [untimed_record(json.loads(line)) for line in path.read_text().splitlines()]
    if path.suffix == ".json":
        return untimed_record(json.loads(path.read_text()))
    rows = [line.split(",") for line in path.read_text().splitlines()]
    kept = [column for column, name in enumerate(rows[0]) if name not in TIMINGS]
    return [[row[column] for column in kept] for row in rows]


def untimed_record(record: object) -> object:
    if isinstance(record, list):
        return [untimed_record(item) for item in record]
    if isinstance(record, dict):
        return {key: untimed_record(value) for key, value in record.items() if key not in TIMINGS}
    return record


def result_files(workdir: Path) -> dict[str, Path]:
    results = workdir / "results" / SUBSET
    files = {}
    for path in sorted(results.rglob("*")):
        if path.is_file():
            name = str(path.relative_to(results))
            files[EVENTS if name.startswith(f"{EVENTS}.out.tfevents.") else name] = path
    return files


def metrics(workdir: Path) -> list[dict]:
    lines = (workdir / "results" / SUBSET / "model" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def rules_run(workdir: Path) -> dict[str, str]:
    """Rule name -> the resources line of its jobs, from the last Snakemake log in ``workdir``."""
    log = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))[-1].read_text()
    job = r"^(?:rule|checkpoint) (\w+):\n(?:[ \t]+\w.*\n)*?[ \t]+resources: (.*)$"
    return dict(re.findall(job, log, re.M))


def jobs_of(cluster: SlurmCluster, workdir: Path) -> list[dict[str, str]]:
    """The SLURM jobs (not their steps) submitted from ``workdir``, oldest first, with the rule
    name taken from the plugin's job comment ``rule_<name>_wildcards_<values>``."""
    fields = ("JobID", "WorkDir", "Comment", "State", "Partition", "Account", "AllocTRES", "Start", "End")
    jobs = [job for job in cluster.accounting(*fields) if job["WorkDir"] == str(workdir)]
    jobs = [job for job in jobs if "." not in job["JobID"]]
    for job in jobs:
        job["rule"] = re.fullmatch(r"rule_(\w+?)(_wildcards_.*)?", job["Comment"]).group(1)
    return sorted(jobs, key=lambda job: int(job["JobID"]))


def training_processes(workdir: Path) -> list[int]:
    """Ids of the Python processes running the train job's script (Snakemake runs a copy of it
    from ``<workdir>/.snakemake/scripts/``)."""
    scripts = f"{workdir}/.snakemake/scripts/"
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_text().split("\0")
            if Path(argv[0]).name.startswith("python") and any(
                arg.startswith(scripts) and arg.endswith(".train.py") for arg in argv[1:]
            ):
                found.append(int(cmdline.parent.name))
    return found


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float) -> None:
    """Poll ``condition()`` until true; fail if ``process`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"snakemake ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.2)


def killed_at_the_time_limit(
    cluster: SlurmCluster, workdir: Path, config: dict, *args: str, profile: Path
) -> subprocess.CompletedProcess:
    """Run snakemake through SLURM, freezing the training (SIGSTOP) once it has written a
    checkpoint, so that it is still running when SLURM's time limit hits, however fast the machine.

    Returns:
        The finished snakemake process, its output in ``stdout``.
    """
    command = snakemake_command(workdir, config, *slurm_options(profile), *args)
    state = workdir / "results" / SUBSET / "model" / "checkpoints" / "state.json"
    with open(workdir / "first-run.out", "w+") as output:
        process = subprocess.Popen(
            command, cwd=workdir, env=cluster.environment, stdout=output, stderr=output
        )
        try:
            wait_for(state.exists, "checkpoint", process, timeout=120)
            frozen = training_processes(workdir)
            assert frozen, "no training process found"
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            # Snakemake sees the kill at the plugin's next status check, then idles until the one
            # after before it exits (the plugin waits 10 s longer after each check): 2-3 minutes.
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
                running = [job["JobID"] for job in jobs_of(cluster, workdir) if job["State"] == "RUNNING"]
                if running:
                    cluster.run("scancel", *running)
        output.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, output.read())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node cluster (2 CPUs, one fake GPU, accounting) for the tests of this module."""
    reason = unmet_needs()
    if reason:
        pytest.skip(reason)
    install_packages()
    with running_cluster(tmp_path_factory.mktemp("slurm-cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("local")
    succeeded(snakemake(workdir, CONFIG, "--cores", str(CPUS), "--resources", "gpu=1"))
    return workdir


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("through-slurm")
    succeeded(through_slurm(cluster, workdir, CONFIG))
    return workdir


def test_a_run_through_slurm_gives_the_results_of_a_local_run_bit_for_bit(cluster, local_run, slurm_run):
    # Data, masks, weights, checkpoints, evaluation, report and inference outputs are byte-identical:
    # CPU training with the same seed and the same number of threads (both runs use the node's
    # 2) is bitwise reproducible. Only the fields that time the work (seconds per iteration, per
    # inferred file) differ; in the files holding them, everything else must be equal.
    local, slurm = result_files(local_run), result_files(slurm_run)
    assert set(slurm) == set(local)
    assert {"model/model_final.pth", "eval/metrics.json", "inference/videos/demo.mp4"} <= set(local)
    for name, path in local.items():
        if slurm[name].read_bytes() == path.read_bytes():
            continue
        if name.endswith(".mp4"):  # see ENCODED
            assert same_pictures(slurm[name], path), f"{name} shows other pictures"
            continue
        assert name in TIMED or any(map(Path(name).match, TIMED_PATTERNS)), f"{name} differs"
        assert untimed(slurm[name]) == untimed(path), f"{name} differs beyond its timings"
    detections = [
        json.loads(local[name].read_text())["instances"]
        for name in local
        if re.fullmatch(r"inference/images/[^./][^/]*\.json", name)  # not the hidden records
    ]
    assert any(detections), "nothing detected: the comparison of inference outputs would be vacuous"


def test_every_job_ran_as_a_slurm_job_with_the_profiles_resources(cluster, slurm_run):
    rules = rules_run(slurm_run)
    gpu_rules = {rule for rule, resources in rules.items() if re.search(r"\bgpu=1\b", resources)}
    assert gpu_rules >= GPU_RULES and not gpu_rules & DATA_RULES
    jobs = jobs_of(cluster, slurm_run)
    assert {job["rule"] for job in jobs} == set(rules) >= GPU_RULES | DATA_RULES
    assert {job["State"] for job in jobs} == {"COMPLETED"}
    assert {job["Account"] for job in jobs} == {ACCOUNT}  # the config's cluster.account
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    for job in jobs:
        settings = cluster.settings(job["JobID"])  # what sbatch asked for
        expected = profile["default-resources"] | profile["set-resources"].get(job["rule"], {})
        if job["rule"].startswith("infer_"):  # the shard rules' own resources (workflow/rules/infer.smk)
            expected |= {"mem_mb": 16000, "runtime": 120}
        hours, minutes = divmod(expected["runtime"], 60)
        assert settings["TimeLimit"] == f"{hours:02d}:{minutes:02d}:00", job
        assert settings["MinMemoryNode"] == f"{expected['mem_mb']}M", job
        if job["rule"] in gpu_rules:
            assert job["Partition"] == GPU_PARTITION, job
            assert settings["TresPerJob"] == "gres:gpu:1" and "gres/gpu=1" in job["AllocTRES"], (
                job
            )  # --gpus=1
            assert settings["NumCPUs"] == str(CPUS), job  # the rules' threads, capped by --max-threads
            if job["rule"] == "train":  # --cpus-per-task=2
                assert (settings["CPUs/Task"], "CpusPerTres" in settings) == (str(CPUS), False), job
            else:  # --cpus-per-gpu=2
                assert settings["CpusPerTres"] == f"gres:gpu:{CPUS}", job
        else:
            assert job["Partition"] == CPU_PARTITION and "gpu" not in job["AllocTRES"], job


def test_inference_shards_run_as_separate_slurm_jobs_at_once_on_their_own_gpus(cluster, slurm_run, tmp_path):
    """Each shard asks one GPU: on the 2-GPU node the two shards of a rerun start together."""
    workdir = tmp_path / "rerun"
    shutil.copytree(slurm_run, workdir, symlinks=True)
    config = CONFIG | {"inference": CONFIG["inference"] | {"max_detections": 99}}  # inference only
    succeeded(through_slurm(cluster, workdir, config))
    jobs = jobs_of(cluster, workdir)
    assert sorted(job["rule"] for job in jobs) == ["infer_00", "infer_01", "inference_summary"]
    first, second = [job for job in jobs if job["rule"].startswith("infer_")]
    assert {first["State"], second["State"]} == {"COMPLETED"}
    assert first["Start"] < second["End"] and second["Start"] < first["End"], (first, second)  # at once
    logs = [(workdir / "logs" / SUBSET / f"{job['rule']}.log").read_text() for job in (first, second)]
    visible = sorted(re.search(r"CUDA_VISIBLE_DEVICES=(\S+)\)", log).group(1) for log in logs)
    assert visible == [str(index) for index in range(GPUS)]  # each shard has its own GPU


def test_a_training_killed_at_its_time_limit_resumes_on_the_next_run(cluster, tmp_path):
    config = CONFIG | {"train": RESUMABLE_TRAINING}
    model = f"results/{SUBSET}/model/model_final.pth"
    inputs = [f"results/{SUBSET}/data/{split}.json" for split in ("train", "val")]
    succeeded(snakemake(tmp_path, config, "--cores", str(CPUS), *inputs))  # data prepared locally
    one_minute = tmp_path / "profile-with-1-minute-training"
    one_minute.mkdir()
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    profile["set-resources"]["train"]["runtime"] = 1
    (one_minute / "config.yaml").write_text(yaml.safe_dump(profile))

    first = killed_at_the_time_limit(cluster, tmp_path, config, model, profile=one_minute)
    assert first.returncode != 0 and "SLURM status is: 'TIMEOUT'" in first.stdout, first.stdout
    assert [(job["rule"], job["State"]) for job in jobs_of(cluster, tmp_path)] == [("train", "TIMEOUT")]
    assert not (tmp_path / model).exists()

    succeeded(through_slurm(cluster, tmp_path, config, model))  # the profile's 12 hours
    assert [job["State"] for job in jobs_of(cluster, tmp_path)] == ["TIMEOUT", "COMPLETED"]
    log = (tmp_path / "logs" / SUBSET / "train.log").read_text()
    resumed = re.search(r"resuming from \S+ at iteration (\d+)", log)
    assert resumed, log
    assert 0 < int(resumed.group(1)) < RESUMABLE_TRAINING["iterations"]
    losses = [record["iteration"] for record in metrics(tmp_path) if "total_loss" in record]
    assert losses == list(
        range(1, RESUMABLE_TRAINING["iterations"] + 1)
    )  # one line per iteration, none twice
