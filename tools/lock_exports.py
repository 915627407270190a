"""Write what is exported from uv.lock (conda environment, Dockerfile versions), or check it equals the lock.

uv.lock is the one list of exact versions. The conda environment of `--use-conda` runs cannot point at
it (Snakemake copies env files under .snakemake/conda), so its pip lines are written here from
`uv export`. The Dockerfile runs the same `uv export` itself during the build; written here are the
versions it needs before that: the uv it installs and its base image's torch and CUDA release (those
of the locked torch and its nvidia-cuda-runtime wheel). Run by tools/upgrade-lock.sh after every
change of the lock; `--check` (tests/test_environments.py) fails when a committed file differs from
what the lock gives.

Usage: python tools/lock_exports.py [--check]
"""

import argparse
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONDA_ENV = REPO / "envs" / "d2retrain.yaml"
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "uv.lock"
# What conda itself gives: the interpreter and pip (the rest comes from PyPI, as in the tests).
CONDA_PYTHON = "3.11"
CONDA_PIP = "26.3"
# `uv export` options shared with the Dockerfile's build step (which adds --extra detectron2,
# --extra track and --extra mlflow).
EXPORT_OPTIONS = ["--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "--no-header", "--no-annotate"]

HEADER = """\
# GENERATED from uv.lock by tools/lock_exports.py (tools/upgrade-lock.sh): do not edit by hand.
#
# Environment of every rule for `snakemake --use-conda`: every runtime package of uv.lock (the
# project's dependencies and theirs, the test and detectron2 extras left out) at its locked version,
# with uv's environment markers. tests/test_environments.py fails when this file differs from the lock.
#
# The project itself is not installed here. Snakemake copies this file to
# <conda-prefix>/<hash>.yaml and conda runs pip in that folder, so `-e ..` would point at
# .snakemake/, and `-e ../..` would work only with the default --conda-prefix and the
# repository as working directory. Jobs import d2retrain from the workflow's src/ instead:
# workflow/rules/common.smk puts it on Snakemake's sys.path, and Snakemake's script preamble
# adds Snakemake's sys.path to each job's. So the environment works with any --conda-prefix or
# --directory, one environment serves every checkout, and a job runs the very code its `code`
# param hashes. detectron2 is not here (its build needs torch and nvcc at install time), so
# `model.engine: auto` picks torchvision; use the container image for detectron2. Nor is the
# tracker (the `track` extra, inference.track): pip would install the opencv-python it asks for
# beside opencv-python-headless (docs/tracking.md#install); the container image has it.
"""


def uv_executable() -> str:
    """The uv beside this Python (the project's environment), else the one on PATH."""
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    if found is None:
        raise SystemExit("lock_exports: no uv found; run tools/setup.sh first")
    return found


def export_lines(*extra_options: str) -> list[str]:
    """The requirement lines `uv export` gives for the lock (with markers, without comments)."""
    output = subprocess.run(
        [uv_executable(), "export", *EXPORT_OPTIONS, *extra_options],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "UV_NO_PROGRESS": "1"},
    ).stdout
    return [line for line in output.splitlines() if line.strip() and not line.startswith("#")]


def conda_env_text() -> str:
    """The text of envs/d2retrain.yaml for the current uv.lock."""
    pip_lines = "".join(f"      - {_quoted(line)}\n" for line in export_lines())
    return (
        f"{HEADER}channels:\n  - conda-forge\n  - nodefaults\ndependencies:\n"
        f"  - python={CONDA_PYTHON}\n  - pip={CONDA_PIP}\n  - pip:\n{pip_lines}"
    )


def locked_version(name: str) -> str:
    """The one version uv.lock holds for NAME."""
    with LOCK.open("rb") as stream:
        versions = {
            package["version"] for package in tomllib.load(stream)["package"] if package["name"] == name
        }
    if len(versions) != 1:
        raise SystemExit(f"lock_exports: uv.lock holds {name} at {sorted(versions) or 'no version'}")
    return versions.pop()


def dockerfile_text() -> str:
    """The Dockerfile with the uv version and the base image's torch and CUDA release of uv.lock."""
    cuda = locked_version("nvidia-cuda-runtime").split(".")
    text = re.sub(
        r"(?m)^ARG UV_VERSION=\S+$", f"ARG UV_VERSION={locked_version('uv')}", DOCKERFILE.read_text()
    )
    return re.sub(
        r"(?m)^FROM pytorch/pytorch:[^-\s]+-cuda[0-9.]+-",
        f"FROM pytorch/pytorch:{locked_version('torch')}-cuda{cuda[0]}.{cuda[1]}-",
        text,
    )


def _quoted(line: str) -> str:
    """A YAML scalar for a requirement line: one with markers (quotes, colons) double-quoted."""
    return line if ";" not in line else json.dumps(line)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare instead of writing; exit 1 on a difference"
    )
    arguments = parser.parse_args()
    differing = 0
    for path, expected in ((CONDA_ENV, conda_env_text()), (DOCKERFILE, dockerfile_text())):
        actual = path.read_text()
        if actual == expected:
            continue
        if not arguments.check:
            path.write_text(expected)
            print(f"wrote {path.relative_to(REPO)}")
            continue
        differing += 1
        diff = difflib.unified_diff(
            actual.splitlines(), expected.splitlines(), "committed", "uv.lock", lineterm=""
        )
        print(f"{path.relative_to(REPO)} differs from uv.lock; run tools/lock_exports.py", *diff, sep="\n")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
