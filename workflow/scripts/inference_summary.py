"""Snakemake job: one row per inferred file, problems first."""

from d2retrain.inference import write_summary
from d2retrain.logutil import run_job

snakemake = globals()["snakemake"]
run_job(snakemake.log[0], write_summary, list(snakemake.input), snakemake.output[0])
