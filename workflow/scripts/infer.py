"""Snakemake job: one shard of a subset's inference files, with the model loaded once."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.infer.pipeline import inference_options, run_inference

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
    reuse=True,  # a file whose outputs were made from the same content, model and options is kept
)
