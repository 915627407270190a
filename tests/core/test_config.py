"""Config errors in one line, early: the key, the value, what is allowed, the nearest known key."""

import copy
import subprocess
import sys

import pytest
import yaml
from helpers import REPO

from d2retrain.core.config import ConfigError, check_config, load_config

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
