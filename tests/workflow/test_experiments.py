"""A subset's experiments: variants named and checked at parse time, compared, the best on val selected."""

import dataclasses
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import DEMO_DATASET, REPO
from helpers.workflow import planned_jobs, snakemake

from d2retrain.cli import main
from d2retrain.compare import ComparisonFiles, Run, comparison_table, find_run, write_comparison
from d2retrain.core.config import ConfigError, check_config, with_defaults
from d2retrain.core.errors import D2RetrainError
from d2retrain.core.fileio import file_digest
from d2retrain.model.folder import ModelFolder
from d2retrain.workflow.experiments import resolve_experiments


def subset_config(**keys) -> dict:
    config = with_defaults(
        {
            "datasets": {"demo": DEMO_DATASET},
            "subsets": {"s": {"dataset": "demo", "categories": ["person"], **keys}},
        }
    )
    return config


def variants(**keys) -> dict:
    config = subset_config(**keys)
    return resolve_experiments("s", config["subsets"]["s"], config["model"], config["train"])


def test_named_experiments_and_grid_points_are_their_union_with_paramspace_names():
    found = variants(
        experiments={"base": None, "low_lr": {"train": {"base_lr": 0.01, "augment": {"crop": 0.5}}}},
        grid={"train.base_lr": [0.01, 0.02], "train.iterations": [200, 400]},
    )
    assert list(found) == [
        "base",
        "low_lr",
        "base_lr~0.01/iterations~200",
        "base_lr~0.01/iterations~400",
        "base_lr~0.02/iterations~200",
        "base_lr~0.02/iterations~400",
    ]
    assert found["base"].overrides == {} and found["base"].train == subset_config()["train"]
    low = found["low_lr"]
    assert low.overrides == {"train.base_lr": 0.01, "train.augment.crop": 0.5}
    assert low.train["base_lr"] == 0.01 and low.train["augment"]["crop"] == 0.5
    assert low.train["augment"]["brightness"] == 0 and low.model == subset_config()["model"]  # the rest kept
    point = found["base_lr~0.02/iterations~200"]
    assert (point.train["base_lr"], point.train["iterations"]) == (0.02, 200)


def test_grid_keys_sharing_a_last_part_are_named_by_their_whole_key():
    found = variants(
        grid={"model.min_size_test": [160], "train.min_size_train": [[160, 192]], "balance": ["none"]}
    )
    assert list(found) == ["min_size_test~160/min_size_train~160,192/balance~none"]


def test_variants_share_data_steps_per_distinct_balancing_setting():
    subset = subset_config()["subsets"]["s"]  # balance: all, repeat_threshold 0.1
    found = variants(
        experiments={"a": {}, "b": {"train": {"base_lr": 0.01}}, "r1": {"balance": "repeat"}},
        grid={"repeat_threshold": [0.1, 0.3], "balance": ["repeat"]},
    )
    files = {name: variant.data_files(subset) for name, variant in found.items()}
    assert files["a"] == files["b"] == ("train.json", None)  # the subset's own data
    assert (
        files["r1"]
        == files["repeat_threshold~0.1/balance~repeat"]
        == (
            "balance~repeat/train.json",
            "balance~repeat/repeat_threshold~0.1.json",
        )
    )
    assert files["repeat_threshold~0.3/balance~repeat"] == (
        "balance~repeat/train.json",
        "balance~repeat/repeat_threshold~0.3.json",
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"experiments": {"a": {"categories": ["car"]}}},
            "experiments.a: categories: variants cannot change it",
        ),
        ({"grid": {"dataset": ["other"]}}, "grid: dataset: variants cannot change it"),
        (
            {"experiments": {"a": {"train": {"base_lrr": 0.1}}}},
            "train.base_lrr is not a key; did you mean train.base_lr?",
        ),
        (
            {"grid": {"train.iteration": [10]}},
            "grid: train.iteration is not a key; did you mean train.iterations?",
        ),
        (
            {"experiments": {"a": {"train": {"base_lr": -1}}}},
            "experiments.a: train.base_lr is -1; expected > 0",
        ),
        ({"grid": {"balance": ["most"]}}, "grid: balance is 'most'; expected one of none, all, repeat"),
        ({"grid": {"train.base_lr": [0.01, 0.01]}}, "two grid points are named base_lr~0.01"),
        (
            {"experiments": {"base_lr~0.1": {}}, "grid": {"train.base_lr": [0.1]}},
            "two variants are named base_lr~0.1",
        ),
        (
            {"grid": {"model.weights": ["my weights.pth"]}},
            "'weights~my weights.pth' is not a safe folder name",
        ),
        ({"experiments": {"a": {"masks": True}}}, "masks: variants cannot change it"),
    ],
)
def test_a_bad_experiment_is_one_line_naming_where(keys, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        variants(**keys)
    assert str(caught.value).startswith("subsets.s.") and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"experiments": {"two words": {}}},
            "config: subsets.s.experiments is 'two words'; expected matching",
        ),
        ({"select": "segm_AR"}, "subsets.s.select is 'segm_AR'; expected one of segm_AP"),
    ],
)
def test_the_schema_refuses_an_unsafe_name_and_an_unknown_select_metric(keys, message):
    config = {
        "datasets": {"demo": DEMO_DATASET},
        "subsets": {"s": {"dataset": "demo", "categories": ["person"], **keys}},
    }
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        check_config(config)
    assert "\n" not in str(caught.value)


def test_the_snakefile_refuses_a_bad_experiment_before_its_first_job(tmp_path):
    config = {
        "datasets": {"demo": DEMO_DATASET},
        "subsets": {
            "s": {"dataset": "demo", "categories": ["person"], "experiments": {"a": {"balance": "most"}}}
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n"]
    result = subprocess.run(
        [*command, "--configfile", str(tmp_path / "config.yaml")], capture_output=True, text=True
    )
    assert result.returncode != 0
    message = "subsets.s.experiments.a: balance is 'most'"
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def fake_run(folder: Path, curve: list[tuple[int, float]], val: float, test: float | None, lr: float) -> Path:
    """A finished experiment folder as the workflow writes it (model/ and eval/), with the given APs."""
    model = ModelFolder(folder / "model")
    model.path.mkdir(parents=True)
    lines = [{"iteration": i, "total_loss": 1.0, "time": 0.5} for i in range(1, curve[-1][0] + 1)]
    lines += [{"iteration": i, "segm_AP": ap, "bbox_AP": ap} for i, ap in curve]
    model.metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    model.best_file.write_text(
        json.dumps({"iteration": max(curve, key=lambda c: c[1])[0], "metric": "segm_AP"})
    )
    model.config_file.write_text(
        yaml.safe_dump({"model": {"engine": "torchvision"}, "solver": {"base_lr": lr}})
    )
    for split, value in (("metrics", val), ("test_metrics", test)):
        if value is None:
            continue
        kinds = {
            kind: {key: value for key in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
            for kind in ("segm", "bbox")
        }
        per_class = {kind: {"person": value, "sports ball": value / 2} for kind in ("segm", "bbox")}
        record = {"retrained": {**kinds, "per_class": per_class}}
        (folder / "eval").mkdir(exist_ok=True)
        (folder / "eval" / f"{split}.json").write_text(json.dumps(record))
    return folder


def test_the_best_val_metric_selects_and_its_test_ap_is_the_one_to_quote(tmp_path):
    folders = {
        "base": fake_run(tmp_path / "base", [(2, 0.3), (4, 0.5)], val=0.5, test=0.45, lr=0.02),
        "low_lr": fake_run(tmp_path / "low_lr", [(2, 0.4), (4, 0.6)], val=0.6, test=0.41, lr=0.01),
    }
    runs = [find_run(folder, name) for name, folder in folders.items()]
    files = ComparisonFiles(*(str(tmp_path / name) for name in ("t.csv", "t.html", "t.png", "selected.json")))
    selected = write_comparison(runs, "segm_AP", files, "Experiments")
    assert selected == {
        "experiment": "low_lr",
        "metric": "segm_AP",
        "value": 0.6,
        "split": "val",
        "test_value": 0.41,
        "variant": "low_lr",
        "seeds": 1,
        "mean": 0.6,
        "spread": 0.0,
        "test_mean": 0.41,
        "within_spread": [],  # one seed each: no spread to compare with
    }
    assert json.loads(Path(files.selected).read_text()) == selected
    table = pd.read_csv(files.table)
    assert list(table.experiment) == ["base", "low_lr"] and list(table.selected) == [False, True]
    assert list(table.overrides) == ["solver.base_lr=0.02", "solver.base_lr=0.01"]  # what differs
    assert list(table["test_segm_AP"]) == [0.45, 0.41] and list(table["val_bbox_AP_sports ball"]) == [
        0.25,
        0.3,
    ]
    assert list(table.iterations) == [4, 4] and list(table.best_iteration) == [4, 4]
    assert list(table.train_minutes) == [round(4 * 0.5 / 60, 2)] * 2
    page = Path(files.page).read_text()
    assert (
        "its test segm_AP, 0.4100, is the estimate to quote" in page
        and "highest val segm_AP (0.6000)" in page
    )
    assert Path(files.plot).read_bytes()[:4] == b"\x89PNG"


def test_seeds_select_the_variant_with_the_best_mean_and_flag_those_within_its_spread(tmp_path):
    values = {"a": [0.50, 0.54, 0.46], "b": [0.53, 0.49, 0.51], "c": [0.30, 0.31, 0.29]}
    runs = [
        dataclasses.replace(
            find_run(
                fake_run(tmp_path / v / f"seed~{k}", [(4, ap)], val=ap, test=ap - 0.1, lr=0.02),
                f"{v}/seed~{k}",
            ),
            variant=v,
        )
        for v, aps in values.items()
        for k, ap in enumerate(aps)
    ]
    files = ComparisonFiles(*(str(tmp_path / name) for name in ("t.csv", "t.html", "t.png", "selected.json")))
    selected = write_comparison(runs, "segm_AP", files, "E")
    assert (
        selected["variant"] == "b" and selected["experiment"] == "b/seed~0"
    )  # best mean 0.51, its best seed
    assert selected["seeds"] == 3 and selected["mean"] == pytest.approx(0.51) and selected["value"] == 0.53
    assert selected["spread"] == pytest.approx(0.02) and selected["test_mean"] == pytest.approx(0.41)
    assert selected["within_spread"] == ["a"]  # 0.50 is within a's spread (0.04) of 0.51; c is not
    table = pd.read_csv(files.table)
    assert list(table.within_spread) == [True] * 3 + [False] * 6
    assert table.mean_val_segm_AP.round(4).tolist() == [0.5] * 3 + [0.51] * 3 + [0.3] * 3
    page = Path(files.page).read_text()
    assert "variant b has the highest mean val segm_AP over its 3 seeds, 0.5100 (spread 0.0200)" in page
    assert "a within the spread: the difference may be noise" in page


def test_seeds_train_each_variant_once_per_seed_from_its_seed_on():
    found = variants(seeds=2, experiments={"a": {}, "b": {"seeds": 1, "train": {"seed": 7}}})
    assert {name: (v.variant, v.train["seed"]) for name, v in found.items()} == {
        "a/seed~0": ("a", 0),
        "a/seed~1": ("a", 1),
        "b": ("b", 7),
    }


def test_without_a_test_split_the_page_says_the_selected_val_ap_is_optimistic(tmp_path):
    runs = [find_run(fake_run(tmp_path / "a", [(4, 0.5)], val=0.5, test=None, lr=0.02), "a")]
    files = ComparisonFiles(*(str(tmp_path / name) for name in ("t.csv", "t.html", "t.png", "selected.json")))
    assert write_comparison(runs, "bbox_AP", files, "E")["test_value"] is None
    assert "there is no test split, so this val bbox_AP is optimistic" in Path(files.page).read_text()


def test_a_run_without_val_evaluations_cannot_be_selected(tmp_path):
    folder = fake_run(tmp_path / "a", [(4, 0.5)], val=None, test=None, lr=0.02)
    table = comparison_table([find_run(folder)])
    assert "val_segm_AP" not in table and table.iterations[0] == 4
    files = ComparisonFiles(*(str(tmp_path / name) for name in ("t.csv", "t.html", "t.png", "s.json")))
    with pytest.raises(D2RetrainError, match="no run has a val segm_AP to select on"):
        write_comparison([Run("a", ModelFolder(folder / "model"), None, None)], "segm_AP", files, "E")


def test_compare_prints_folders_made_by_hand_side_by_side(tmp_path, capsys):
    fake_run(tmp_path / "runs" / "first", [(4, 0.5)], val=0.5, test=None, lr=0.02)
    fake_run(tmp_path / "runs" / "second", [(4, 0.7)], val=0.7, test=None, lr=0.01)
    output = tmp_path / "table.csv"
    status = main(
        ["compare", str(tmp_path / "runs/first/model"), str(tmp_path / "runs/second"), "-o", str(output)]
    )
    printed = capsys.readouterr().out
    assert status == 0 and "highest val segm_AP: second (0.7000)" in printed
    assert re.search(r"first\s+False\s+first\s+solver.base_lr=0.02\s+0.500", printed), printed
    assert list(pd.read_csv(output).experiment) == ["first", "second"]
    assert main(["compare", str(tmp_path)]) == 2  # no model there: one line, exit 2


def log_span(path: Path) -> tuple[datetime, datetime]:
    """The first and last time stamps of a job's log."""
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", path.read_text(), re.M)
    first, last = (datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f") for stamp in (stamps[0], stamps[-1]))
    return first, last


def jobs_run(output: str) -> set[str]:
    """The rules of the jobs a snakemake run finished (`all` left out)."""
    return set(re.findall(r"\(Rule: (\w+)\)", output)) - {"all"}


@pytest.mark.slow
def test_variants_train_side_by_side_and_only_a_new_selection_moves_the_served_model(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["demo"] = {
        "root": "resources/demo",
        "train_images": 8,
        "val_images": 4,
        "video_frames": 2,
        "test_images": 4,
    }
    config["datasets"]["demo"]["test"] = {
        "images": "resources/demo/test",
        "annotations": "resources/demo/annotations/instances_test.json",
    }
    config["subsets"]["person_ball"] |= {
        "experiments": {"base": {}, "repeat": {"balance": "repeat"}},
        "masks": False,
    }
    config["train"] = {"iterations": 2, "eval_period": 2, "warmup_iterations": 1, "steps": []}
    config["inference"] = {"images": [], "videos": []}  # its rules wait for select as the card's do
    config["mlflow"] = {
        "tracking_uri": "sqlite:///results/mlflow.db"
    }  # two trainings at once on one SQLite file
    # two trainings at once, and one thread a job: the jobs after training are mostly start-up, two at
    # a time; the model card and the AP table stand for the served model's readers (not the
    # prediction grid: an inference of its own)
    single = [f"{rule}=1" for rule in ("train_experiment", "evaluate_experiment_with_test")]
    targets = ["selected.json", "experiments.html", "eval/test_metrics.json", "eval/ap_table.html"]
    targets = [f"results/person_ball/{name}" for name in [*targets, "model/MODEL_CARD.md"]]
    two_at_once = (*targets, "--resources", "gpu=2", "--set-threads", *single)
    output = snakemake(tmp_path, config, *two_at_once)
    assert re.search(r"train_experiment\s+2\n", output) and "balance_variant" in output  # repeat's own data
    spans = {
        name: log_span(tmp_path / f"logs/person_ball/experiments/{name}/train.log")
        for name in ("base", "repeat")
    }
    (start_a, end_a), (start_b, end_b) = spans.values()
    assert start_a < end_b and start_b < end_a, spans  # gpu=2: the two trainings overlap

    results = tmp_path / "results/person_ball"
    selected = json.loads((results / "selected.json").read_text())
    other = {"base": "repeat", "repeat": "base"}[selected["experiment"]]
    served = results / "experiments" / selected["experiment"] / "model" / "model.pth"
    assert file_digest(results / "model/model.pth") == file_digest(served)  # the selected variant's weights
    assert (results / "experiments" / other / "model/tensorboard").is_dir()
    table = pd.read_csv(results / "experiments.csv")
    assert list(table.experiment) == ["base", "repeat"] and list(table.overrides.fillna("")) == [
        "",
        "balance=repeat",
    ]
    assert (
        table.test_segm_AP.notna().all()
        and selected["test_value"] == table.test_segm_AP[table.selected].item()
    )
    assert "is the estimate to quote" in (results / "experiments.html").read_text()
    served_test = json.loads((results / "eval/test_metrics.json").read_text())["retrained"]["segm"]["AP"]
    assert served_test == selected["test_value"]  # the served model's test AP is the selected variant's

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{results.parent / 'mlflow.db'}")
    runs = {
        run.info.run_name: run
        for run in client.search_runs([client.get_experiment_by_name("d2retrain").experiment_id])
    }
    assert set(runs) == {"person_ball/base", "person_ball/repeat"}
    for name, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.params["solver.iterations"] == "2"
        assert {"val_segm_AP", "test_segm_AP", "segm_AP", "lr"} <= set(run.data.metrics), name
    selected_run = runs[f"person_ball/{selected['experiment']}"].info.run_id
    assert {"MODEL_CARD.md", "loss.png", "val", "test"} <= {
        a.path for a in client.list_artifacts(selected_run)
    }
    assert {a.path for a in client.list_artifacts(selected_run, "val")} == {
        "val/metrics.json",
        "val/per_class.csv",
    }
    assert not any("locked" in log.read_text() for log in (tmp_path / "logs").rglob("*.log"))

    evaluation = results / "experiments" / other / "eval/metrics.json"
    record = json.loads(evaluation.read_text())
    record["retrained"]["bbox"]["AP75"] += 0.001  # evaluated again, no better: select alone reruns
    evaluation.write_text(json.dumps(record))
    config["mlflow"]["tracking_uri"] = ""  # and tracking turned off reruns nothing
    assert jobs_run(snakemake(tmp_path, config, *two_at_once)) == {"select"}  # (nothing else was due)

    record["retrained"]["segm"]["AP"] = 0.99  # evaluated again, now the best: the served model follows
    evaluation.write_text(json.dumps(record))
    ran = jobs_run(snakemake(tmp_path, config, *two_at_once))
    assert {"select", "serve_selected", "serve_selected_test", "model_card", "ap_table"} <= ran, ran
    assert not ran & {"train_experiment", "evaluate_experiment_with_test", "evaluate_with_test"}
    assert json.loads((results / "selected.json").read_text())["experiment"] == other
    assert file_digest(results / "model/model.pth") == file_digest(
        served.parents[2] / other / "model/model.pth"
    )

    config["subsets"]["person_ball"]["experiments"][selected["experiment"]] = {"train": {"base_lr": 0.01}}
    jobs = planned_jobs(tmp_path, config)  # one variant's keys changed: that variant alone retrains
    assert jobs["train_experiment"] == 1 and not {"filter", "balance", "balance_variant", "stats"} & set(jobs)
