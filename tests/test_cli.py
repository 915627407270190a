"""The command line: happy paths and one clear line for each user error."""

import json
import subprocess
import sys

import pytest
from helpers import COCO_MINI, make_coco, write_json

from d2retrain.cli import main


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err.strip().splitlines()


def test_filter_accepts_the_spellings_of_coco_managers_filter_py(tmp_path, coco_file, capsys):
    source = coco_file([[1, 37], [3]])
    status, _ = run_cli(
        capsys,
        "filter",
        "--input_json",
        source,
        "--output_json",
        tmp_path / "o.json",
        "--categories",
        "person",
    )
    assert status == 0
    assert [a["id"] for a in json.loads((tmp_path / "o.json").read_text())["annotations"]] == [1]


def test_filter_then_balance_on_coco_mini(tmp_path, capsys):
    filtered, balanced = tmp_path / "f.json", tmp_path / "b.json"
    source = COCO_MINI / "annotations" / "instances_train2017.json"
    assert run_cli(capsys, "filter", "-i", source, "-o", filtered, "-c", "person", "sports ball")[0] == 0
    status, lines = run_cli(capsys, "balance", "-i", filtered, "-o", balanced)
    assert status == 0
    document = json.loads(source.read_text())
    names = {category["id"]: category["name"] for category in document["categories"]}
    found: dict[int, set[str]] = {}
    for annotation in document["annotations"]:
        found.setdefault(annotation["image_id"], set()).add(names[annotation["category_id"]])
    either = sum(bool(kinds & {"person", "sports ball"}) for kinds in found.values())
    both = sum({"person", "sports ball"} <= kinds for kinds in found.values())
    assert any(f"{either} -> {both} images" in line for line in lines), lines
    assert len(json.loads(balanced.read_text())["images"]) == both > 0


def _mutated(change) -> dict:
    document = make_coco([[1, 37], [3], [1]])
    change(document)
    return document


CASES = {
    "missing file": (None, "no such file"),
    "a folder": ("folder", "is a folder"),
    "malformed JSON": (b"{not json", "not valid JSON"),
    "truncated JSON": ("truncated", "not valid JSON"),
    "no images": (_mutated(lambda d: d.pop("images")), "missing key(s) images"),
    "no annotations": (_mutated(lambda d: d.pop("annotations")), "missing key(s) annotations"),
    "no categories": (_mutated(lambda d: d.pop("categories")), "missing key(s) categories"),
    "duplicate image ids": (
        _mutated(lambda d: d["images"][1].update(id=1)),
        "image id 1 appears more than once",
    ),
    "duplicate annotation ids": (
        _mutated(lambda d: d["annotations"][1].update(id=1)),
        "annotation id 1 appears",
    ),
    "unknown image": (_mutated(lambda d: d["annotations"][0].update(image_id=42)), "image_id is 42"),
    "unknown category": (_mutated(lambda d: d["annotations"][0].update(category_id=42)), "category_id is 42"),
    "wrong id type": (_mutated(lambda d: d["annotations"][0].update(id="1")), "Expected `int`, got `str`"),
    "unknown name": ("names:person,sport ball", "did you mean 'sports ball'"),
    "unknown name among several": ("names:person,car,sports ball,bicycle", "no category named 'bicycle'"),
    "no annotations for a category": (
        _mutated(lambda d: d["annotations"][2].update(category_id=1)),
        "'car' has no",
    ),
    "absolute file_name": (
        _mutated(lambda d: d["images"][0].update(file_name="/tmp/x.jpg")),
        "absolute path",
    ),
    "climbing file_name": (
        _mutated(lambda d: d["images"][0].update(file_name="a/../../x.jpg")),
        "climbs out",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_filter_errors_print_one_line_and_write_nothing(tmp_path, capsys, case):
    content, words = CASES[case]
    source = tmp_path / "in.json"
    names = ["person", "car", "sports ball"]
    if isinstance(content, dict):
        write_json(source, content)
    elif isinstance(content, bytes):
        source.write_bytes(content)
    elif content == "folder":
        source.mkdir()
    elif content == "truncated":
        source.write_text(json.dumps(make_coco([[1]]))[:-30])
    elif content is not None:
        write_json(source, make_coco([[1, 37], [3]]))
        names = content.removeprefix("names:").split(",")
    output = tmp_path / "out.json"
    status, lines = run_cli(capsys, "filter", "-i", source, "-o", output, "-c", *names)
    assert status == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("d2retrain filter: error: ") and str(source) in lines[0]
    assert words in lines[0]
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != source.name] == []


def test_filter_leaves_its_input_untouched(tmp_path, coco_file, capsys):
    source = coco_file([[1, 37], [3]])
    before = source.read_bytes()
    run_cli(capsys, "filter", "-i", source, "-o", tmp_path / "o.json", "-c", "sports ball")
    assert source.read_bytes() == before


def test_empty_result_of_the_area_option_is_an_error(tmp_path, coco_file, capsys):
    status, lines = run_cli(
        capsys,
        "filter",
        "-i",
        coco_file([[1]]),
        "-o",
        tmp_path / "o.json",
        "-c",
        "person",
        "--min-area",
        "1e9",
    )
    assert status == 2 and "no annotations left after the area and crowd options" in lines[-1]


def test_balance_with_no_image_holding_every_category_writes_nothing(tmp_path, coco_file, capsys):
    filtered = tmp_path / "f.json"
    run_cli(capsys, "filter", "-i", coco_file([[1], [37]]), "-o", filtered, "-c", "person", "sports ball")
    status, lines = run_cli(capsys, "balance", "-i", filtered, "-o", tmp_path / "b.json")
    assert status == 2 and "no image holds every category" in lines[-1]
    assert not (tmp_path / "b.json").exists()


def test_the_console_script_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "d2retrain.cli",
            "filter",
            "-i",
            tmp_path / "nope.json",
            "-o",
            tmp_path / "o.json",
            "-c",
            "person",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"d2retrain filter: error: {tmp_path / 'nope.json'}: no such file; check the path in the config"
    )


def _subcommand_defaults(command: str) -> dict:
    from d2retrain.cli import build_parser

    parser = build_parser()
    (commands,) = [action for action in parser._actions if action.dest == "command"]
    return {action.dest: action.default for action in commands.choices[command]._actions}


def _schema(path: str):
    """A key's node in the schema itself, read here from the YAML file, not through the package."""
    import yaml

    from d2retrain.core.config import SCHEMA_FILE

    node = yaml.safe_load(SCHEMA_FILE.read_text())
    for part in path.split("."):
        node = node["additionalProperties"] if part == "*" else node["properties"][part]
    return node


@pytest.mark.parametrize(
    ("command", "option", "key"),
    [
        ("filter", "min_area", "subsets.*.min_area"),
        ("filter", "drop_crowd", "subsets.*.drop_crowd"),
        ("filter", "keep_empty_images", "subsets.*.keep_empty_images"),
        ("balance", "mode", "subsets.*.balance"),
        ("demo-data", "seed", "demo.seed"),
        ("demo-data", "train", "demo.train_images"),
        ("demo-data", "val", "demo.val_images"),
        ("demo-data", "video_frames", "demo.video_frames"),
        ("evaluate", "device", "train.device"),
        ("infer", "score_threshold", "inference.score_threshold"),
        ("infer", "max_detections", "inference.max_detections"),
        ("infer", "device", "inference.device"),
        ("infer", "save_frames", "inference.save_frames"),
        ("infer", "max_frames", "inference.max_frames"),
        ("infer", "batch_size", "inference.batch_size"),
    ],
)
def test_each_command_line_default_is_the_schemas(command, option, key):
    assert _subcommand_defaults(command)[option] == _schema(key)["default"]


def test_balance_modes_and_engines_are_the_schemas_enums_and_every_engine_is_registered():
    from d2retrain.cli import build_parser
    from d2retrain.data.filtering import BALANCE_MODES
    from d2retrain.model.engines import ENGINES, MODEL_ENGINES
    from d2retrain.train.engines import TRAIN_ENGINES

    assert list(BALANCE_MODES) == _schema("subsets.*.balance")["enum"]
    (commands,) = [action for action in build_parser()._actions if action.dest == "command"]
    (mode,) = [action for action in commands.choices["balance"]._actions if action.dest == "mode"]
    assert list(mode.choices) == list(BALANCE_MODES)
    assert list(ENGINES) == _schema("model.engine")["enum"]
    assert set(ENGINES) - {"auto"} == set(MODEL_ENGINES) == set(TRAIN_ENGINES)


def test_categories_lists_every_category_and_what_balancing_a_candidate_list_keeps(capsys):
    source = COCO_MINI / "annotations" / "instances_train2017.json"
    assert main(["categories", str(source)]) == 0
    lines = capsys.readouterr().out.splitlines()
    document = json.loads(source.read_text())
    assert lines[0].endswith(f"{len(document['images'])} images, 80 categories") and len(lines) == 2 + 80
    person = sum(a["category_id"] == 1 for a in document["annotations"])
    assert lines[2].split()[:3] == ["1", "person", str(person)]  # the most instances first
    counts = [int(line.split()[-3]) for line in lines[2:]]
    assert counts == sorted(counts, reverse=True)
    assert main(["categories", str(source), "-c", "person", "dog"]) == 0
    out = capsys.readouterr().out
    per_image: dict[int, set[int]] = {}
    for annotation in document["annotations"]:
        per_image.setdefault(annotation["image_id"], set()).add(annotation["category_id"])
    both = sum({1, 18} <= found for found in per_image.values())
    assert f", {both} with every one (balance: all keeps" in out
    assert main(["categories", str(source), "-c", "unicorn"]) == 2


def test_every_option_of_every_command_has_help():
    import argparse

    from d2retrain.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not action.help and action.dest != "help"
    ]
    assert missing == []
    assert "(default: 0.5)" in commands.choices["infer"].format_help()  # defaults shown
