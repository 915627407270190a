# d2retrain: COCO categories -> filtered, balanced data -> Mask R-CNN -> predictions.
# Stages live in workflow/rules/, logic in src/d2retrain/, config keys in its schema.
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from d2retrain.core.config import ConfigError, check_config, with_defaults
from d2retrain.core.errors import D2RetrainError
from d2retrain.model.sources import check_model_setting

if not config:

    configfile: "config/config.yaml"


# The schema is package data of d2retrain, which reads the same file: a problem is one line
# (check_config), then the defaults are filled in as the CLI fills them (with_defaults); the engine
# and a local weights file are checked too. Any of them stops the run before its first job.
try:
    check_config(config)
    config.update(with_defaults(config))
    check_model_setting(config["model"])
except D2RetrainError as error:
    sys.exit(str(error) if isinstance(error, ConfigError) else f"config: {error}")


container: config["container"]


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/common_experiments.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/experiments.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_outputs(),


rule data:
    input:
        [data_outputs(subset) for subset in config["subsets"]],
