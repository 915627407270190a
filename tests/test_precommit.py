"""The pre-commit hooks: local only, and every one passes on the project's own files, offline."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

CONFIG = REPO / ".pre-commit-config.yaml"


def test_every_hook_is_local_and_runs_a_tool_of_the_environment():
    config = yaml.safe_load(CONFIG.read_text())
    assert [repo["repo"] for repo in config["repos"]] == ["local"]  # nothing fetched from a git host
    hooks = {hook["id"]: hook for hook in config["repos"][0]["hooks"]}
    assert list(hooks) == ["ruff", "ruff-format", "snakefmt", "mypy", "fast-tests"]
    assert all(hook["language"] == "system" for hook in hooks.values())
    bin_dir = Path(sys.executable).parent
    for hook in hooks.values():
        tool = hook["entry"].split()[0]
        assert tool == "bash" or (bin_dir / tool).is_file(), f"{tool} is not in {bin_dir}"
    assert hooks["fast-tests"]["entry"] == "bash tools/test.sh --fast --no-lint"


@pytest.mark.slow
def test_pre_commit_runs_every_hook_on_the_tracked_files_offline(tmp_path):
    """On a copy of the tracked files (a repository of its own), with no network and an empty
    pre-commit cache: the lint hooks pass; the fast tier is left out (it is this test's own tier)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    copy = tmp_path / "repo"
    for name in filter(None, files):
        if (REPO / name).is_file() and not name.startswith("tests/assets/"):
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    for command in (["git", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(command, cwd=copy, check=True)
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PRE_COMMIT_HOME": str(tmp_path / "cache"),
        "SKIP": "fast-tests",
        "http_proxy": "http://127.0.0.1:9",  # offline: a fetch would fail
        "https_proxy": "http://127.0.0.1:9",
        "MYPY_CACHE_DIR": str(tmp_path / "mypy"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pre_commit", "run", "--all-files"],
        cwd=copy, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for hook in ("ruff check", "ruff format --check", "snakefmt --check", "mypy"):
        assert any(line.startswith(hook) and line.endswith("Passed") for line in lines), (hook, result.stdout)
    assert any(line.startswith("fast tier") and line.endswith("Skipped") for line in lines), result.stdout
    assert not list((tmp_path / "cache").glob("repo*"))  # no hook repository was cloned
