"""Snakemake job: one row per inferred file, problems first."""

from d2retrain.core.logutil import run_job
from d2retrain.infer.summary import write_summary

snakemake = globals()["snakemake"]
run_job(snakemake.log[0], write_summary, list(snakemake.input), snakemake.output[0])
