"""Planning time of `snakemake --dry-run` with many inference files, beside a bare Snakefile.

For each size (1,000, 10,000 and 100,000 images by default) it times, as child processes,
`snakemake -n` of the workflow and of a bare Snakefile with one job per image (the smallest
workflow that names every output), in four states:

- fresh: the images are new (the model is trained, nothing inferred yet);
- up to date: every output exists and is newer than its inputs;
- one added: one more image in the folder;
- all newer: every image is newer than its outputs.

The workflow's model comes from one real run of the demo at 2 iterations (about a minute). The
inference outputs of the "up to date" state are not computed (100,000 images would take an hour
on a CPU): they are hard links of one real output, status files list them, and
`snakemake --touch` marks them up to date. The bare Snakefile's
outputs are hard links too. Every image is a hard link of one demo JPEG; only directory entries
are created.

Usage: python benchmarks/bench_plan.py [--sizes 1000 10000 100000] [--workdir DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from d2retrain.data.demo import write_demo_dataset  # noqa: E402
from d2retrain.infer.inputs import InputFile, output_files  # noqa: E402
from d2retrain.infer.summary import FileStatus  # noqa: E402
from d2retrain.workflow.planning import shards  # noqa: E402

SHARDS = 4
BARE = """\
import os

PICTURES = config["pictures"]
NAMES = sorted(os.path.splitext(name)[0] for name in os.listdir(PICTURES))


rule all:
    input:
        expand("out/{name}.json", name=NAMES),


rule infer:
    input:
        os.path.join(PICTURES, "{name}.jpg"),
    output:
        "out/{name}.png",
        "out/{name}.json",
    shell:
        "touch {output}"
"""


def snakemake(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile") -> str:
    command = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir), "--cores", "2"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def plan_seconds(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile") -> tuple[float, int]:
    """Wall time of one dry run, and the jobs it plans."""
    start = time.perf_counter()
    text = snakemake(workdir, "--dry-run", *args, snakefile=snakefile)
    seconds = time.perf_counter() - start
    if "Nothing to be done" in text:
        return seconds, 0
    totals = [line.split() for line in text.splitlines() if line.startswith("total")]
    return seconds, int(totals[-1][1])


LINKS_PER_INODE = 50_000  # ext4 allows 65,000 links to one inode


def link_all(source: Path, targets: list[Path]) -> None:
    """Hard-link ``targets`` to ``source``, or to a fresh copy of it every LINKS_PER_INODE links."""
    for start in range(0, len(targets), LINKS_PER_INODE):
        origin = source
        if start:
            origin = source.with_name(f"{source.stem}.{start}{source.suffix}")
            shutil.copy2(source, origin)
        for target in targets[start : start + LINKS_PER_INODE]:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(origin, target)


def fill(folder: Path, count: int, source: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    link_all(source, [folder / f"img_{index:06d}.jpg" for index in range(count)])


def workflow_setup(workdir: Path, pictures: Path) -> Path:
    """A finished demo run whose inference then names ``pictures``; returns the config file."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["demo"] = {"root": "resources/demo", "train_images": 8, "val_images": 4, "video_frames": 4}
    config["train"] = {"iterations": 2, "eval_period": 0, "checkpoint_period": 2, "warmup_iterations": 1}
    config["inference"] = {"images": [], "videos": []}
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    snakemake(workdir, "--configfile", str(path), "--resources", "gpu=1")
    config["inference"] = {"images": [str(pictures)], "videos": [], "shards": SHARDS}
    path.write_text(yaml.safe_dump(config))
    return path


def fake_inference(workdir: Path, config: Path, pictures: Path) -> None:
    """Every file's outputs as hard links of one drawn PNG and JSON, the status files that list
    them, an empty summary and report folder, then `snakemake --touch`."""
    folder = workdir / "results/person_ball/inference"
    png, record = folder / "sample.png", folder / "sample.json"
    if not png.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "benchmarks" / "bench_plan.py", record)  # any small file will do
        shutil.copy(record, png)
    files = [InputFile.of(path, "image") for path in sorted(pictures.iterdir())]
    link_all(png, [Path(output_files(item, str(folder))[0]) for item in files])
    link_all(record, [Path(output_files(item, str(folder))[1]) for item in files])
    for shard, items in shards(files, SHARDS).items():
        statuses = [FileStatus(item.path, item.kind, item.name, frames=1).__dict__ for item in items]
        status = folder / "status" / f"shard_{shard:02d}.json"
        status.parent.mkdir(parents=True, exist_ok=True)
        status.write_text(json.dumps(statuses))
    (folder / "summary.csv").touch()
    (folder / "predictions_coco.json").touch()
    (folder / "drawn").mkdir(exist_ok=True)
    snakemake(workdir, "--configfile", str(config), "--touch")


def bare_outputs(workdir: Path, pictures: Path) -> None:
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    sample = workdir / "sample.out"
    sample.touch()
    stems = [path.stem for path in pictures.iterdir()]
    link_all(sample, [out / f"{stem}{suffix}" for stem in stems for suffix in (".png", ".json")])
    for path in out.iterdir():
        os.utime(path)  # newer than the pictures


def touch_all(pictures: Path) -> None:
    now = time.time() + 1
    for path in pictures.iterdir():
        os.utime(path, (now, now))


def measure(size: int, root: Path, demo_jpeg: Path) -> list[tuple[str, float, int, float, int]]:
    rows = []
    ours, bare = root / f"ours_{size}", root / f"bare_{size}"
    pictures = root / f"pictures_{size}"
    fill(pictures, size, demo_jpeg)
    config = workflow_setup(ours, pictures)
    bare.mkdir(exist_ok=True)
    snakefile = bare / "Snakefile"
    snakefile.write_text(BARE)
    bare_args = ("--config", f"pictures={pictures}")

    def both(state: str) -> None:
        seconds, jobs = plan_seconds(ours, "--configfile", str(config))
        bare_seconds, bare_jobs = plan_seconds(bare, *bare_args, snakefile=snakefile)
        rows.append((state, seconds, jobs, bare_seconds, bare_jobs))
        print(
            f"{size:>7} {state:<11} {seconds:8.2f} s {jobs:>4} jobs   "
            f"bare {bare_seconds:8.2f} s {bare_jobs:>7} jobs   ratio {seconds / bare_seconds:5.2f}",
            flush=True,
        )

    both("fresh")
    fake_inference(ours, config, pictures)
    bare_outputs(bare, pictures)
    both("up to date")
    shutil.copy(demo_jpeg, pictures / "added.jpg")
    both("one added")
    touch_all(pictures)
    both("all newer")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--workdir", type=Path, help="kept afterwards (default: a temporary folder)")
    args = parser.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_plan_"))
    root.mkdir(parents=True, exist_ok=True)
    demo = write_demo_dataset(root / "demo", train=1, val=1, video_frames=1)
    demo_jpeg = sorted(demo.images("val").iterdir())[0]
    print(f"{'files':>7} {'state':<11} {'workflow':>10} {'':>9}   {'bare Snakefile':>19}")
    try:
        for size in args.sizes:
            measure(size, root, demo_jpeg)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
