"""Snakemake job: the retrained model's predictions on the first val images, in a grid."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.report import write_prediction_grid

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    write_prediction_grid,
    str(Path(snakemake.input.weights).parent),
    snakemake.input.val,
    snakemake.input.val_images,
    list(snakemake.params.categories),
    snakemake.output[0],
    score_threshold=snakemake.params.score_threshold,
    device=snakemake.params.device,
    threads=snakemake.threads,
)
