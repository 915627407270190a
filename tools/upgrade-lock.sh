#!/usr/bin/env bash
# Move uv.lock to the newest versions pyproject.toml allows: all packages, or only those named
# (tools/upgrade-lock.sh msgspec numpy). Then rewrite what is exported from the lock
# (envs/d2retrain.yaml, the Dockerfile's uv version and base image tag) and show what changed.
# Nothing else changes versions: a new release on PyPI reaches the project only through this.
#
# Before committing: `bash tools/test.sh` installs the new lock into .venv and runs every check;
# commit uv.lock, envs/ and the Dockerfile together only when it passes. A new torch also needs a
# pytorch/pytorch image of that version and CUDA release (the FROM line written here).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV="$VENV" bash tools/setup.sh --uv-only
if [ $# -eq 0 ]; then
  "$VENV/bin/uv" lock --upgrade
else
  "$VENV/bin/uv" lock $(printf -- '--upgrade-package %q ' "$@")
fi
"$VENV/bin/python" tools/lock_exports.py
git --no-pager diff --stat -- uv.lock envs Dockerfile
echo "next: bash tools/test.sh; commit uv.lock, envs/ and Dockerfile together when it passes"
