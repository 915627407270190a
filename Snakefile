# d2retrain: COCO categories -> filtered, balanced data -> Mask R-CNN -> predictions.
# Stages live in workflow/rules/, logic in src/d2retrain/, config keys in its schema.
from snakemake.utils import min_version, validate

min_version("9.0")


if not config:

    configfile: "config/config.yaml"


# The schema is package data of d2retrain, which reads the same file.
validate(config, "src/d2retrain/core/config.schema.yaml")


container: config["container"]


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
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
