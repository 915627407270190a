#!/usr/bin/env bash
# Set up (once) and run every check: ruff, snakefmt, snakemake --lint and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test]'
export PATH="$PWD/$VENV/bin:$PATH"
ruff check .
ruff format --check .
snakefmt --check Snakefile workflow
snakemake --lint
pytest "$@"
