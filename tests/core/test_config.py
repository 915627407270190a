"""Config errors in one line, early: the key, the value, what is allowed, the nearest known key."""

import copy
import subprocess
import sys

import pytest
import yaml
from helpers import REPO

from d2retrain.core.config import ConfigError, check_config, load_config, with_defaults

DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def changed(section: str, value) -> dict:
    config = copy.deepcopy(DEFAULT)
    config[section] = value
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            changed("train", {"iteration": 5}),
            "config: train.iteration is not a key; did you mean train.iterations?",
        ),
        (changed("infer", {"images": []}), "config: infer is not a key; did you mean inference?"),
        (
            changed("train", {"iterations": "many"}),
            "config: train.iterations is 'many'; expected of type integer",
        ),
        (changed("train", {"iterations": 0}), "config: train.iterations is 0; expected >= 1"),
        (
            changed("model", {"engine": "tensorflow"}),
            "config: model.engine is 'tensorflow'; expected one of auto, detectron2, torchvision",
        ),
        (
            changed("subsets", {"s": {"dataset": "demo", "categories": ["person"], "balanse": "all"}}),
            "config: subsets.s.balanse is not a key; did you mean subsets.s.balance?",
        ),
        (
            changed("datasets", {"d": {"all": {"images": "x", "annotations": "y"}}}),
            "config: datasets.d needs train + val or all + val_split; it has all",
        ),
        (changed("train", {"zzz": 1}), "config: train.zzz is not a key; known: "),
        (
            changed("train", {"iterations": 5, "min_size_test": 800}),
            "config: train.min_size_test moved to model.min_size_test; rename the key",
        ),
    ],
)
def test_a_config_error_is_one_line_naming_the_key_and_what_is_allowed(config, message):
    with pytest.raises(ConfigError) as raised:
        check_config(config)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    assert len(str(raised.value)) < 400  # never the schema


def test_the_default_config_passes_and_a_file_error_names_the_file(tmp_path):
    check_config(copy.deepcopy(DEFAULT))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"iteration": 5}}))
    with pytest.raises(
        ConfigError, match=f"^{path}: train.iteration is not a key; did you mean train.iterations"
    ):
        load_config(path)


def test_the_workflow_stops_before_any_job_with_that_one_line(tmp_path):
    bad = changed("train", {"iteration": 5})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(bad))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path)]
    result = subprocess.run(
        [*command, "--configfile", str(tmp_path / "config.yaml"), "--cores", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == ["config: train.iteration is not a key; did you mean train.iterations?"]
    assert not (tmp_path / "resources").exists() and not (tmp_path / "results").exists()


def test_defaults_are_filled_at_every_depth_without_changing_what_was_given():
    config = changed("subsets", {"s": {"dataset": "d", "categories": ["cat"]}})
    config["datasets"] = {
        "d": {"all": {"images": "i", "annotations": "a.json"}, "val_split": {"fraction": 0.2}}
    }
    config["train"] = {"iterations": 7, "augment": {"crop": 0.5}}
    before = copy.deepcopy(config)
    full = with_defaults(config)
    assert config == before  # a copy
    assert full["train"]["iterations"] == 7 and full["train"]["eval_period"] == 200
    assert full["train"]["augment"] == {
        "brightness": 0, "contrast": 0, "saturation": 0, "crop": 0.5, "scale_jitter": None
    }  # fmt: skip
    assert full["model"]["min_size_test"] == 192 and full["inference"]["batch_size"] >= 1
    assert full["subsets"]["s"]["balance"] == "all"
    assert full["datasets"]["d"]["val_split"] == {"fraction": 0.2, "seed": 0, "test_fraction": 0}


def test_the_workflow_and_the_cli_fill_the_same_defaults_as_snakemakes_validate_did(tmp_path):
    from snakemake.utils import validate

    config = changed("train", {"iterations": 3, "augment": {}})
    config["model"] = {"min_size_test": 160}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    by_snakemake = copy.deepcopy(config)
    validate(by_snakemake, str(REPO / "src" / "d2retrain" / "core" / "config.schema.yaml"))
    assert with_defaults(config) == load_config(path) == by_snakemake


def test_the_python_api_names_a_moved_key_too(tmp_path):
    from d2retrain.train.run import train_from_config

    missing = str(tmp_path / "none.json")  # refused before any file is read
    with pytest.raises(
        ConfigError, match=r"^train_from_config: train\.min_size_test moved to model\.min_size_test"
    ):
        train_from_config(
            model={},
            train={"min_size_test": 800},
            classes=["person"],
            train_json=missing,
            train_images=str(tmp_path),
            val_json=missing,
            val_images=str(tmp_path),
            source_json=missing,
            output_dir=str(tmp_path / "model"),
        )
