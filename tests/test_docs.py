"""The docs cannot lie: generated references are current, every config block validates, every
documented command and option exists, every link resolves, and the README's own-data config runs."""

import argparse
import copy
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import COCO_MINI, REPO

from d2retrain.cli import build_parser
from d2retrain.core.config import check_config

PAGES = sorted(
    [
        REPO / "README.md",
        REPO / "CHANGELOG.md",
        REPO / "config" / "README.md",
        REPO / "benchmarks" / "README.md",
        *(REPO / "docs").glob("*.md"),
    ]
)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
NOT_A_CONFIG = "<!-- not a config -->"
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def blocks(kind: str) -> list[tuple[Path, str]]:
    """Fenced blocks of a language in the Markdown pages (a yaml block after NOT_A_CONFIG left out)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip().splitlines()[-1:] or [""]
            if match.group(1) == kind and before[0].strip() != NOT_A_CONFIG:
                found.append((page, match.group(2)))
    return found


def merged(base: dict, fragment: dict) -> dict:
    result = copy.deepcopy(base)
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def test_the_generated_references_are_current():
    spec = importlib.util.spec_from_file_location("docs_reference", REPO / "tools" / "docs_reference.py")
    assert spec is not None and spec.loader is not None
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    for path, text in reference.pages().items():
        assert path.read_text() == text, f"{path.relative_to(REPO)} is stale: python tools/docs_reference.py"
    config = reference.config_reference()
    for key in (
        "train.iterations",
        "train.keep_checkpoints",
        "subsets.<name>.balance",
        "inference.batch_size",
    ):
        assert f"| `{key}` |" in config


def test_every_config_block_of_the_docs_validates_over_the_default_config():
    found = blocks("yaml")
    assert len(found) >= 3
    for page, text in found:
        fragment = yaml.safe_load(text)
        try:
            check_config(merged(DEFAULT, fragment))
        except Exception as error:
            pytest.fail(f"{page.relative_to(REPO)}: {error}")


def subcommands() -> dict[str, set[str]]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    top = {option for action in parser._actions for option in action.option_strings}
    return {
        name: top | {option for action in sub._actions for option in action.option_strings}
        for name, sub in commands.choices.items()
    }


def test_every_documented_d2retrain_command_and_option_exists():
    known = subcommands()
    seen = 0
    for page, text in blocks("bash"):
        for line in text.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while "d2retrain" in words:
                words = words[words.index("d2retrain") + 1 :]
                if not words or words[0].startswith("-"):
                    continue
                command = words[0]
                assert command in known, f"{page.relative_to(REPO)}: d2retrain {command} is no command"
                options = {word.split("=")[0] for word in words if word.startswith("-") and word != "-"}
                unknown = options - known[command]
                assert not unknown, f"{page.relative_to(REPO)}: d2retrain {command} has no {sorted(unknown)}"
                seen += 1
    assert seen >= 15


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_every_relative_link_and_anchor_resolves():
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.exists(), f"{page.relative_to(REPO)}: {target} does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", FENCE.sub("", resolved.read_text()), re.M)
                assert anchor in {slug(h) for h in headings}, (
                    f"{page.relative_to(REPO)}: no #{anchor} in {path}"
                )


def test_the_readme_is_a_short_guide_in_the_promised_order():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings == ["Two commands", "Your own data in five steps", "Common variations", "Documentation"]
    for page in (REPO / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in text, f"the README's contents lack docs/{page.name}"


def own_data_config(tmp_path: Path) -> dict:
    """The README's own-data config, its paths pointing at the repository's coco-mini photos."""
    (config_block,) = [text for page, text in blocks("yaml") if page.name == "README.md"]
    config = yaml.safe_load(config_block)
    for split in ("train", "val"):
        config["datasets"]["mine"][split] = {
            "images": str(COCO_MINI / f"{split}2017"),
            "annotations": str(COCO_MINI / "annotations" / f"instances_{split}2017.json"),
        }
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in sorted((COCO_MINI / "val2017").glob("*.jpg"))[:2]:
        shutil.copy(photo, photos / photo.name)
    config["inference"]["images"] = [str(photos)]
    return config


def snakemake(workdir: Path, config: dict, *arguments: str) -> subprocess.CompletedProcess:
    (workdir / "mine.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    command += ["--configfile", str(workdir / "mine.yaml"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=1200)


@pytest.mark.slow
def test_the_readme_own_data_config_plans_and_runs_on_real_photos(tmp_path):
    config = own_data_config(tmp_path)
    plan = snakemake(tmp_path, config, "--dry-run")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert re.search(r"^train\s+1$", plan.stdout, re.M) and "repeat_factors" in plan.stdout
    config["train"] |= {"iterations": 2, "eval_period": 0, "warmup_iterations": 1, "steps": []}
    run = snakemake(tmp_path, config, "--cores", "2", "--resources", "gpu=1")
    assert run.returncode == 0, run.stderr[-3000:]
    results = tmp_path / "results" / "people_dogs"
    assert (results / "model" / "MODEL_CARD.md").is_file() and (results / "eval" / "metrics.json").is_file()
    assert len(list((results / "inference" / "images").glob("*.png"))) == 2
    document = yaml.safe_load((COCO_MINI / "annotations" / "instances_train2017.json").read_text())
    dog = next(c["id"] for c in document["categories"] if c["name"] == "dog")
    dogs = sum(a["category_id"] == dog for a in document["annotations"] if not a["iscrowd"])
    checks = (results / "stats" / "data_checks.html").read_text()
    assert dogs < 10 and f"dog has {dogs} training instance(s)" in checks  # the data speaks up
