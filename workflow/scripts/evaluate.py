"""Snakemake job: COCO AP of the subset's model on its val split."""

from pathlib import Path

from d2retrain.engines import evaluate_model
from d2retrain.logutil import run_job

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    evaluate_model,
    str(Path(snakemake.input.weights).parent),
    snakemake.input.val,
    snakemake.input.val_images,
    list(snakemake.params.categories),
    snakemake.output.metrics,
    snakemake.output.per_class,
    device=snakemake.params.device,
    threads=snakemake.threads,
)
