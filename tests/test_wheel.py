"""The package as a user installs it: a wheel built from a clean tree, installed without -e, runs.

A source checkout finds files beside the package (the schema once lived in workflow/schemas/); an
installed wheel has only what the wheel holds. So the wheel is built from the tracked files alone
(an ignored build/ folder could slip an old flat copy of the modules into it), installed into a fresh
environment at the locked versions, and run from a folder outside the repository.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import make_coco, write_json

REPO = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).parent / "uv"

pytestmark = pytest.mark.slow


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    environment = {
        key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    return subprocess.run(
        [str(part) for part in command], cwd=cwd, env=environment, capture_output=True, text=True
    )


def _clean_tree(destination: Path) -> Path:
    """The tracked files and the untracked ones git does not ignore: no build/, caches or results."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the bin/ folder of a fresh environment with the wheel and the locked dependencies)."""
    root = tmp_path_factory.mktemp("wheel")
    tree = _clean_tree(root / "tree")
    built = _run(UV, "build", "--wheel", "--out-dir", root / "dist", tree, cwd=root)
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("d2retrain-*.whl")
    constraints = _run(
        UV, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "--no-header", cwd=REPO
    )
    (root / "constraints.txt").write_text(constraints.stdout)
    venv = root / "venv"
    for command in (
        [UV, "venv", "--quiet", "--python", sys.executable, venv],
        [
            UV,
            "pip",
            "install",
            "--quiet",
            "--python",
            venv / "bin" / "python",
            "-c",
            root / "constraints.txt",
            wheel,
        ],
    ):
        result = _run(*command, cwd=root)
        assert result.returncode == 0, result.stderr
    return wheel, venv / "bin"


def test_the_wheel_holds_exactly_the_tracked_package_files_and_the_schema(installed):
    wheel, _ = installed
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "src/d2retrain"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    package_files = {
        name for name in zipfile.ZipFile(wheel).namelist() if not name.split("/")[0].endswith(".dist-info")
    }
    assert package_files == {name.removeprefix("src/") for name in tracked}
    assert "d2retrain/core/config.schema.yaml" in package_files


def test_the_installed_wheel_runs_from_outside_the_repository(installed, tmp_path):
    _, bin_dir = installed
    where = _run(bin_dir / "python", "-c", "import d2retrain; print(d2retrain.__file__)", cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(bin_dir.parent), where.stdout
    version = _run(bin_dir / "d2retrain", "--version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert "0.1.0" in version.stdout
    train_help = _run(bin_dir / "d2retrain", "train", "--help", cwd=tmp_path)
    assert train_help.returncode == 0, train_help.stderr
    assert "--config" in train_help.stdout


def test_the_installed_wheel_filters_a_real_file(installed, tmp_path):
    _, bin_dir = installed
    source = write_json(tmp_path / "in.json", make_coco([[1, 37], [3], [37, 37]]))
    result = _run(
        bin_dir / "d2retrain",
        "filter",
        "-i",
        source,
        "-o",
        tmp_path / "out.json",
        "-c",
        "sports ball",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads((tmp_path / "out.json").read_text())
    assert [category["name"] for category in output["categories"]] == ["sports ball"]
    assert len(output["annotations"]) == 3
    assert {annotation["category_id"] for annotation in output["annotations"]} == {1}


def test_the_environment_without_extras_makes_a_snakemake_report(installed, tmp_path):
    """`snakemake --report` needs pygments (and more): a runtime dependency, not a test extra's."""
    _, bin_dir = installed
    rule = [
        "rule all:",
        "    output:",
        '        report("a.txt", caption="a.rst"),',
        "    shell:",
        '        "echo hi > {output}"',
    ]
    (tmp_path / "Snakefile").write_text("\n".join(rule) + "\n")
    (tmp_path / "a.rst").write_text("A file.\n")
    run = _run(bin_dir / "snakemake", "--cores", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = _run(bin_dir / "snakemake", "--report", "report.html", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report.html").stat().st_size > 10_000
    probe = "import importlib.util as u; print(u.find_spec('pytest') is None)"  # no test extra here
    assert _run(bin_dir / "python", "-c", probe, cwd=tmp_path).stdout.strip() == "True"
