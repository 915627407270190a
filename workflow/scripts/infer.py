"""Snakemake job: one shard of a subset's inference files, with the model loaded once."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.infer.options import inference_options
from d2retrain.workflow.shard import infer_shard

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    infer_shard,
    str(Path(snakemake.input.weights).parent),
    list(snakemake.input.images),
    list(snakemake.input.videos),
    snakemake.output.status,
    inference_options(snakemake.params.options),
    list(snakemake.params.categories),
    threads=snakemake.threads,
)
