"""Snakemake job: COCO AP of the subset's model on its val split."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.model.engines import evaluate_model

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
    score_threshold=snakemake.params.score_threshold,
)
