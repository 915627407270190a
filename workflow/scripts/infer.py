"""Snakemake job: one shard of a subset's inference files, with the model loaded once."""

from pathlib import Path

from d2retrain.inference import inference_options, run_inference
from d2retrain.logutil import run_job

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    run_inference,
    str(Path(snakemake.input.weights).parent),
    list(snakemake.input.images),
    list(snakemake.input.videos),
    str(Path(snakemake.output.status).parent.parent),
    inference_options(snakemake.params.options),
    expected_classes=list(snakemake.params.categories),
    status_path=snakemake.output.status,
    threads=snakemake.threads,
)
