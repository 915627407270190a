#!/usr/bin/env bash
# Set up (or bring up to date) the environment .venv exactly as uv.lock says: needs only Python 3.11+.
# Arguments go to `uv sync` (tools/test.sh passes --extra test); `--uv-only` stops once uv is there
# (tools/upgrade-lock.sh). uv itself is installed with pip at the version uv.lock holds (the `dev`
# group), so the lock is the one list of versions.
#
# `--locked` stops with uv's message when pyproject.toml changed and uv.lock was not regenerated
# (tools/upgrade-lock.sh). `--inexact` keeps what is in .venv but not in the lock, such as a
# detectron2 built by hand from its repository (it is not on PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
uv_version=$("$VENV/bin/python" - <<'PY'
import tomllib

with open("uv.lock", "rb") as stream:
    (version,) = [package["version"] for package in tomllib.load(stream)["package"] if package["name"] == "uv"]
print(version)
PY
)
if [ "$("$VENV/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$uv_version" ]; then
  "$VENV/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check "uv==$uv_version"
fi
if [ "${1:-}" = "--uv-only" ]; then
  exit 0
fi
# uv's cache (~/.cache/uv) is hard-linked into .venv when both are on one file system, so the ~3 GB
# of wheels are not stored twice; a second setup takes seconds.
# --compile-bytecode writes the .pyc files at install time (as pip does; uv does not by default):
# where PYTHONDONTWRITEBYTECODE is set, Python would otherwise compile torch, snakemake and the rest
# from source in every process: `import torch, torchvision, snakemake.api` took 13.6 s, now 4.8 s,
# and each workflow job and test starts that much sooner. It costs ~17 s per setup on 2 cores.
# The `track` extra (inference.track: the trackers library) always: the workflow's default config
# may turn tracking on, and it costs ~60 MB.
UV_PROJECT_ENVIRONMENT="$VENV" "$VENV/bin/uv" sync --locked --inexact --compile-bytecode --extra track "$@"
