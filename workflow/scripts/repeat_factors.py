"""Snakemake job: repeat factors of a subset's training images (balance: repeat)."""

from d2retrain.core.logutil import run_job
from d2retrain.data.repeat import write_repeat_factors

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    write_repeat_factors,
    snakemake.input[0],
    snakemake.output[0],
    snakemake.params.threshold,
)
