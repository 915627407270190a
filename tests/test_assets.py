"""The repository carries the real data its tests read, and no tracked file reads beside it."""

import json
import re
import subprocess
from pathlib import Path

import pytest
from helpers import ASSETS, COCO_MINI, REPO, VIDEO

# A relative path that climbs (`../`, `../../`) and then names something: `../x.jpg`, not `../..`.
CLIMBING = re.compile(r"(?<![\w./])((?:\.\./)+[\w\-][\w.\-]*(?:/[\w.\-]+)*)")
# A Python path built above the repository: the repository's `.parent`, or `parents[N]` past the file's depth.
ABOVE_REPO = re.compile(r"\b(?:REPO|REPO_ROOT|ROOT)\.parent\b")
PARENTS = re.compile(r"Path\(__file__\)\.resolve\(\)\.parents\[(\d+)\]")
LINK = re.compile(r"\]\(([^)\s#]+)")
# Paths in these files are read from the working directory (the repository's root), not the file's.
FROM_THE_ROOT = {".md", ".yaml", ".yml", ".sh"}


def tracked_text_files() -> list[tuple[Path, str]]:
    """Every tracked text file with its text, but the assets, the lock and this file (whose
    examples name such paths on purpose)."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    files = []
    for name in listed.stdout.splitlines():
        path = REPO / name
        if (
            name == "uv.lock"
            or name.startswith("tests/assets/")
            or path == Path(__file__)
            or not path.is_file()
        ):
            continue
        try:
            files.append((path, path.read_text()))
        except UnicodeDecodeError:
            continue
    return files


def paths_leaving_the_repository(path: Path, text: str) -> list[str]:
    """Every data path named in ``text`` that resolves outside the repository's root."""
    root = REPO.resolve()
    found = []
    if path.suffix == ".md":  # a Markdown link is relative to its page, whatever the working directory
        found += [
            link for link in LINK.findall(text) if not (path.parent / link).resolve().is_relative_to(root)
        ]
        text = LINK.sub("](", text)
    bases = [path.parent] + ([REPO] if path.suffix in FROM_THE_ROOT else [])
    found += [
        token
        for token in CLIMBING.findall(text)
        if any(not (base / token).resolve().is_relative_to(root) for base in bases)
    ]
    found += ABOVE_REPO.findall(text)
    depth = len(path.relative_to(REPO).parts) - 1  # parents[depth] is the repository's root
    found += [match.group(0) for match in PARENTS.finditer(text) if int(match.group(1)) > depth]
    return found


def test_no_tracked_file_names_a_path_outside_the_repository():
    leaving = {}
    for path, text in tracked_text_files():
        if found := paths_leaving_the_repository(path, text):
            leaving[str(path.relative_to(REPO))] = found
    assert leaving == {}


@pytest.mark.parametrize(
    ("name", "text", "found"),
    [
        ("config/x.yaml", "images: ../outside/coco-mini/val2017", ["../outside/coco-mini/val2017"]),
        ("tests/x.py", 'DATA = ROOT.parent / "data"', ["ROOT.parent"]),
        (
            "tests/x.py",
            "Path(__file__).resolve().parents[2] / 'shared'",
            ["Path(__file__).resolve().parents[2]"],
        ),
        ("tests/x.py", "Path(__file__).resolve().parents[1] / 'tests'", []),
        ("tests/x.py", 'open("../../data/x.json")', ["../../data/x.json"]),
        ("workflow/rules/x.smk", 'script: "../scripts/x.py"', []),
        ("workflow/rules/x.smk", 'script: "../../../x.py"', ["../../../x.py"]),
        ("README.md", "--configfile config/coco-mini.yaml", []),
        ("docs/x.md", "figures in [benchmarks](../benchmarks/README.md#speed)", []),
        ("docs/x.md", "see [there](../../elsewhere/notes.md)", ["../../elsewhere/notes.md"]),
        ("README.md", "snakemake --configfile ../elsewhere/config.yaml", ["../elsewhere/config.yaml"]),
        ("envs/x.yaml", "`-e ../..` would work only", []),
        ("tests/x.py", 'file_name="a/../../x.jpg"', []),
    ],
)
def test_the_outside_path_check_finds_what_leaves_and_only_that(name, text, found):
    assert paths_leaving_the_repository(REPO / name, text) == found


def documents() -> dict[str, dict]:
    return {
        split: json.loads((COCO_MINI / "annotations" / f"instances_{split}2017.json").read_text())
        for split in ("train", "val")
    }


def test_coco_mini_keeps_what_the_tests_need():
    for split, document in documents().items():
        assert {"info", "licenses", "images", "annotations", "categories"} <= document.keys()
        ids = [category["id"] for category in document["categories"]]
        assert len(ids) == 80 and min(ids) == 1 and max(ids) == 90  # COCO's own ids, with their gaps
        names = {category["id"]: category["name"] for category in document["categories"]}
        licences = {licence["id"] for licence in document["licenses"]}
        for image in document["images"]:
            assert (COCO_MINI / f"{split}2017" / image["file_name"]).is_file(), image["file_name"]
            assert image["license"] in licences
        per_image: dict[int, set[str]] = {}
        for annotation in document["annotations"]:
            per_image.setdefault(annotation["image_id"], set()).add(names[annotation["category_id"]])
        assert sum({"person", "sports ball"} <= found for found in per_image.values()) >= 2
        crowd = [a for a in document["annotations"] if a["iscrowd"]]
        assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)  # RLE
        assert any(isinstance(a["segmentation"], list) for a in document["annotations"])  # polygons
        sizes = {(image["width"] > image["height"]) for image in document["images"]}
        assert sizes == {True, False}  # landscape and portrait photos
    named = {image["file_name"] for image in documents()["val"]["images"]}
    assert set(p.name for p in (COCO_MINI / "val2017").glob("*.jpg")) - named  # files the JSON omits
    assert VIDEO.is_file() and (VIDEO.parent / "LICENSE.intel-sample-videos.txt").is_file()


def test_the_assets_readme_table_matches_the_files():
    table = (ASSETS / "README.md").read_text()
    for split, document in documents().items():
        names = {category["id"]: category["name"] for category in document["categories"]}
        per_image: dict[int, set[str]] = {}
        for annotation in document["annotations"]:
            per_image.setdefault(annotation["image_id"], set()).add(names[annotation["category_id"]])
        counted = [
            len(document["images"]),
            len(document["annotations"]),
            sum(names[a["category_id"]] == "person" for a in document["annotations"]),
            sum(names[a["category_id"]] == "sports ball" for a in document["annotations"]),
            sum({"person", "sports ball"} <= found for found in per_image.values()),
            sum(a["iscrowd"] for a in document["annotations"]),
            sum(image["height"] > image["width"] for image in document["images"]),
        ]
        assert f"| {split}2017 | " + " | ".join(map(str, counted)) + " |" in table
    total = sum(path.stat().st_size for path in ASSETS.rglob("*") if path.is_file())
    assert total < 20e6, total
