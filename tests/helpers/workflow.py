"""Running the workflow for real in a test: snakemake on a config, what a dry run plans, the main
job's config, copies of a finished run."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import REPO


def snakemake(workdir: Path, config: dict, *args: str) -> str:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    command += ["--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def planned_jobs(workdir: Path, config: dict) -> dict[str, int]:
    """Rule name -> job count of the jobs a dry run plans."""
    text = snakemake(workdir, config, "--dry-run")
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", text, re.M) if rule != "total"}


def main_config() -> dict:
    """The embedded default as the README runs it, plus the opt-ins: exports (both formats), and
    the demo video's tracks scored against its ground truth (docs/tracking.md)."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["export"] = {"formats": ["onnx", "torchscript"]}
    config["inference"] |= {
        "track": True,
        "trail_frames": 10,
        "ground_truth": {"demo": "resources/demo/video/demo.gt.txt"},
    }
    return config


def copy_run(source: Path, target: Path) -> Path:
    """A copy of a finished run's folder (outputs, logs, Snakemake's records, time stamps kept), for
    a test that changes it: a dry run there plans what it plans in ``source``."""
    shutil.copytree(source, target, symlinks=True)
    return target
