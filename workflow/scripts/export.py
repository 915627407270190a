"""Snakemake job: export the subset's model to one format and verify it on the val split."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.model.export import export_model

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    export_model,
    str(Path(snakemake.input.weights).parent),
    snakemake.wildcards.format,
    str(Path(snakemake.output.contract).parent),
    snakemake.input.val,
    snakemake.input.val_images,
    reference_metrics=snakemake.input.metrics,
    threads=snakemake.threads,
)
