"""The workflow's inference planning: files found once, files a rule writes first, stable shards,
lost outputs."""

import pytest

from d2retrain.core.errors import D2RetrainError
from d2retrain.infer.inputs import InputFile
from d2retrain.workflow.planning import (
    InferencePlan,
    demo_planned_files,
    first_missing_output,
    lost_outputs,
    shard_count,
    shard_of,
    shards,
)


def after_new(groups: dict) -> InputFile:
    return next(item for group in groups.values() for item in group if item.name == "new")


def test_files_a_rule_writes_first_are_planned_until_they_exist(tmp_path):
    planned = demo_planned_files(str(tmp_path / "demo"), {"train": 1, "val": 2})
    video = str(tmp_path / "demo" / "video" / "demo.mp4")
    plan = InferencePlan([str(tmp_path / "demo" / "val") + "/"], [video], planned)
    assert [(f.kind, f.name) for f in plan.files] == [
        ("image", "demo_val_0000"),
        ("image", "demo_val_0001"),
        ("video", "demo"),
    ]
    assert plan.waits_for_a_rule(plan.files[:1]) and plan.planned == {f.path for f in plan.files}
    (tmp_path / "demo" / "val").mkdir(parents=True)  # written, with other files than planned
    (tmp_path / "demo" / "val" / "z.jpg").write_bytes(b"x")
    plan = InferencePlan([str(tmp_path / "demo" / "val")], [], planned)
    assert [f.name for f in plan.files] == ["z"] and not plan.waits_for_a_rule(plan.files)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a{1}.jpg"], r"1 file\(s\) with \{ or \} in their path"),
        (["a.jpg", "sub/a.png"], "would both write images/a"),
    ],
)
def test_a_plan_refuses_braces_and_clashing_names_across_specs(tmp_path, names, message):
    (tmp_path / "sub").mkdir()
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(D2RetrainError, match=message):
        InferencePlan([str(tmp_path / name) for name in names], [], {})


def test_shards_are_stable_when_files_are_added():
    files = [InputFile(f"in/img_{i:03d}.jpg", "image", f"img_{i:03d}") for i in range(200)]
    before = {item.name: shard for shard, group in shards(files, 4).items() for item in group}
    after = shards([*files, InputFile("in/new.jpg", "image", "new")], 4)
    moved = {
        item.name for shard, group in after.items() for item in group if before.get(item.name, -1) != shard
    }
    assert moved == {"new"}
    assert min(len(group) for group in after.values()) > 30  # a hash spreads the files
    # the shard follows the output name, not the folder: moving the inputs moves no output
    assert shard_of(InputFile("elsewhere/new.png", "image", "new"), 4) == shard_of(after_new(after), 4)


@pytest.mark.parametrize(
    ("files", "count"), [(0, 1), (25, 1), (1000, 1), (1001, 2), (2500, 4), (4001, 8), (100_000, 128)]
)
def test_auto_shards_are_one_per_1000_files_rounded_up_to_a_power_of_two(files, count):
    assert shard_count(files, "auto") == count
    assert shard_count(files, 3) == 3  # a number is taken as it is


def test_auto_shards_keep_every_file_in_place_until_the_files_double():
    files = [InputFile(f"in/img_{i:05d}.jpg", "image", f"img_{i:05d}") for i in range(3000)]
    before = {item.name: shard for shard, group in shards(files, "auto").items() for item in group}
    assert sorted(before.values()) == sorted(shard_of(item, 4) for item in files)
    grown = shards([*files, *[InputFile(f"in/x{i}.jpg", "image", f"x{i}") for i in range(900)]], "auto")
    assert all(
        before[item.name] == shard for shard, group in grown.items() for item in group if item.name in before
    )


def test_a_shard_has_lost_an_output_only_once_it_ran(tmp_path):
    files = [InputFile(f"in/img_{i}.jpg", "image", f"img_{i}") for i in range(3)]
    folder = tmp_path / "results/s/inference"
    groups = {0: files[:2], 1: files[2:]}
    assert lost_outputs(groups, [str(folder)]) == {0: None, 1: None}  # never ran
    (folder / "status").mkdir(parents=True)
    (folder / "status" / "shard_00.json").write_text("[]")
    (folder / "images").mkdir()
    for name in ("img_0.png", "img_0.json", "img_1.png"):
        (folder / "images" / name).write_bytes(b"x")
    assert first_missing_output(files[:2], folder) == "images/img_1.json"
    assert lost_outputs(groups, [str(folder)]) == {0: "images/img_1.json", 1: None}


def test_ground_truth_needs_tracking_and_names_an_inference_video():
    from d2retrain.workflow.planning import tracked_videos

    files = [InputFile("clips/match.mp4", "video", "match"), InputFile("a.jpg", "image", "a")]
    truth = {"match": "gt/match.txt"}
    assert tracked_videos(files, {"ground_truth": truth, "track": True}) == truth
    assert tracked_videos(files, {"ground_truth": {}, "track": False}) == {}
    with pytest.raises(D2RetrainError, match=r"scores tracks: set inference\.track: true too"):
        tracked_videos(files, {"ground_truth": truth, "track": False})
    with pytest.raises(D2RetrainError, match=r"a not among the inference videos \(their names: match\)"):
        tracked_videos(files, {"ground_truth": {"a": "gt.txt"}, "track": True})
