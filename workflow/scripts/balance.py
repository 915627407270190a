"""Snakemake job: balance one filtered split."""

from d2retrain.core.logutil import run_job
from d2retrain.data.prepare import balance_file

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    balance_file,
    snakemake.input[0],
    snakemake.output[0],
    snakemake.params.mode,
    snakemake.threads,
)
