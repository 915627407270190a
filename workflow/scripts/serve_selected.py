"""Snakemake job: the selected variant's model and evaluation as the subset's (hard links)."""

from d2retrain.core.fileio import link_files
from d2retrain.core.logutil import run_job

snakemake = globals()["snakemake"]
run_job(snakemake.log[0], link_files, dict(snakemake.input), dict(snakemake.output))
