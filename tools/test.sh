#!/usr/bin/env bash
# Set up (or bring up to date, from uv.lock) and run every check: ruff, snakefmt, snakemake --lint,
# import-linter, mypy and pytest. CI runs it as it is: every test, slow ones included.
#
#   bash tools/test.sh               every check and every test (CI; about 20 minutes on 2 cores)
#   bash tools/test.sh --fast        every check and the tests not marked slow (about 2.5 minutes)
#   bash tools/test.sh --fast --no-lint   the fast tests alone (the pre-commit hook: the other
#                                    hooks lint)
# Further arguments go to pytest (`bash tools/test.sh --fast tests/data -k split`).
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
lint=1
while [ $# -gt 0 ]; do
  case "$1" in
    --fast) fast=1 ;;
    --no-lint) lint=0 ;;
    *) break ;;
  esac
  shift
done
VENV=${VENV:-.venv}
# Disk: the environment takes about 6 GB (PyTorch's CUDA build), the tests about 2 GB at their peak.
need_gb=3
if [ ! -x "$VENV/bin/python" ]; then
  need_gb=10
fi
for where in . "${TMPDIR:-/tmp}"; do
  free_gb=$(df -Pk "$where" | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt "$need_gb" ]; then
    echo "tools/test.sh: warning: ${free_gb} GB free under $where; setup and tests need about ${need_gb} GB" >&2
  fi
done
# The environment exactly as uv.lock says (the test extra included): tools/setup.sh.
VENV="$VENV" bash tools/setup.sh --extra test --quiet
export PATH="$PWD/$VENV/bin:$PATH"
if [ "$lint" = 1 ]; then
  ruff check .
  ruff format --check .
  snakefmt --check Snakefile workflow
  snakemake --lint
  lint-imports  # the layers contract of pyproject.toml
  mypy          # src/, as configured in pyproject.toml
fi
# Tests side by side: one worker per core and one more, because the workflow tests spend part of
# their time waiting on subprocesses (Snakemake's job polls, SLURM's status checks), at most 4
# (each training takes 2 threads); the tests sharing a module-scoped fixture stay in one worker
# (tests/conftest.py marks them).
select=()
workers=$(($(nproc) + 1))
if [ "$fast" = 1 ]; then
  select=(-m "not slow")
  workers=$(nproc)  # no waiting there: a worker per core
fi
pytest --numprocesses "$workers" --maxprocesses 4 --dist loadgroup "${select[@]}" "$@"
