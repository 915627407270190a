"""Experiments: a three-variant grid on the demo, planned and run by the workflow, selected on val and
reported on test; and what an MLflow store that is down costs a training.

``workflow``: writes a config (the demo with a test split, one subset with a grid of three learning
rates, tracked in MLflow on SQLite), runs ``snakemake --cores 2 --resources gpu=1`` on it, and prints
each variant's val and test segm AP, the selected one, the test AP to quote, the wall time of the run
and of each training, and what a dry run plans after one variant's keys change and after a variant is
added.

``mlflow-down``: trains the demo network for ``--iterations`` iterations three ways in this process:
without tracking (the baseline), with a tracking URI nothing listens on, and with a SQLite store;
prints each one's seconds and its ratio to the baseline.

Usage: python benchmarks/bench_experiments.py workflow [--iterations 150] [--keep DIR]
       python benchmarks/bench_experiments.py mlflow-down [--iterations 20]
"""

import argparse
import json
import logging
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["person", "sports ball"]

__all__ = ["grid_config", "run_workflow", "mlflow_down", "main"]


def grid_config(iterations: int) -> dict:
    """The demo with a test split and one subset with three learning rates, tracked on SQLite."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["demo"] = {"root": "resources/demo", "test_images": 24}
    config["datasets"]["demo"]["test"] = {
        "images": "resources/demo/test",
        "annotations": "resources/demo/annotations/instances_test.json",
    }
    config["subsets"]["person_ball"]["grid"] = {"train.base_lr": [0.005, 0.02, 0.08]}
    config["train"] = {
        "iterations": iterations,
        "eval_period": iterations // 3,
        "steps": [int(iterations * 0.8)],
        "warmup_iterations": 20,
    }
    config["inference"] = {"images": [], "videos": []}
    config["mlflow"] = {"tracking_uri": "sqlite:///results/mlflow.db"}
    return config


def _snakemake(workdir: Path, config: dict, *args: str) -> str:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    command += ["--configfile", str(workdir / "config.yaml"), "--cores", "2", "--resources", "gpu=1", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    return result.stdout + result.stderr


def _planned(workdir: Path, config: dict) -> dict[str, int]:
    text = _snakemake(workdir, config, "--dry-run")
    return {
        rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", text, re.M) if rule not in ("total", "all")
    }


def run_workflow(workdir: Path, iterations: int) -> None:
    """Run the grid, then print the comparison and what changes replan."""
    config = grid_config(iterations)
    start = time.perf_counter()
    _snakemake(workdir, config)
    wall = time.perf_counter() - start
    results = workdir / "results" / "person_ball"
    table = pd.read_csv(results / "experiments.csv")
    selected = json.loads((results / "selected.json").read_text())
    columns = ["experiment", "selected", "val_segm_AP", "test_segm_AP", "val_bbox_AP", "test_bbox_AP"]
    columns += ["iterations", "train_minutes", "best_iteration"]
    print(f"workflow: {len(table)} variants x {iterations} iterations in {wall / 60:.1f} min (2 cores, CPU)")
    print(table[columns].to_string(index=False, float_format="{:.3f}".format))
    print(
        f"selected {selected['experiment']} by val segm AP {selected['value']:.3f}; "
        f"its test segm AP, the estimate to quote: {selected['test_value']:.3f}"
    )
    changed = json.loads(json.dumps(config))
    changed["subsets"]["person_ball"]["experiments"] = {"low": {"train": {"base_lr": 0.001}}}
    print("dry run after adding a variant plans:", _planned(workdir, changed))
    changed = json.loads(json.dumps(config))
    changed["subsets"]["person_ball"]["grid"]["train.base_lr"][0] = 0.004
    print("dry run after changing one variant's value plans:", _planned(workdir, changed))


def _prepare(folder: Path) -> None:
    """A small demo dataset filtered to the two classes, in ``folder``."""
    from d2retrain.data.demo import write_demo_dataset
    from d2retrain.data.filtering import FilterOptions
    from d2retrain.data.prepare import filter_file

    layout = write_demo_dataset(folder / "demo", train=16, val=4, video_frames=2)
    for split in ("train", "val"):
        filter_file(str(layout.annotations(split)), str(folder / f"{split}.json"), CLASSES, FilterOptions())


def _train_seconds(folder: Path, iterations: int, mlflow) -> float:
    from d2retrain.train.run import train_from_config

    start = time.perf_counter()
    train_from_config(
        model={},
        train={"iterations": iterations, "eval_period": 0, "checkpoint_period": iterations, "device": "cpu"},
        classes=CLASSES,
        train_json=str(folder / "train.json"),
        train_images=str(folder / "demo" / "train"),
        val_json=str(folder / "val.json"),
        val_images=str(folder / "demo" / "val"),
        source_json=str(folder / "demo" / "annotations" / "instances_train.json"),
        output_dir=str(folder / f"model_{time.monotonic_ns()}"),
        threads=2,
        mlflow=mlflow,
    )
    return time.perf_counter() - start


def mlflow_down(iterations: int) -> None:
    """Training seconds without tracking, with a store that is down, and with SQLite."""
    from d2retrain.core.mlflowlog import MlflowSettings

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        _prepare(folder)
        _train_seconds(folder, 2, None)  # warm-up: imports, the first model build
        cases = {
            "no tracking (baseline)": None,
            "server down": MlflowSettings(f"http://127.0.0.1:{port}", "bench", "down"),
            "sqlite store": MlflowSettings(f"sqlite:///{folder}/mlflow.db", "bench", "sqlite"),
        }
        seconds = {name: _train_seconds(folder, iterations, settings) for name, settings in cases.items()}
    base = seconds["no tracking (baseline)"]
    for name, value in seconds.items():
        print(f"{name:24} {value:7.1f} s  {value / base:5.2f}x  ({value - base:+.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["workflow", "mlflow-down"])
    parser.add_argument("--iterations", type=int, help="per training (workflow: 150, mlflow-down: 20)")
    parser.add_argument("--keep", help="run the workflow in this folder and keep it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.part == "mlflow-down":
        mlflow_down(args.iterations or 20)
        return
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        run_workflow(Path(args.keep), args.iterations or 150)
        return
    with tempfile.TemporaryDirectory() as scratch:
        run_workflow(Path(scratch), args.iterations or 150)


if __name__ == "__main__":
    main()
