"""Snakemake job: the selected variant's model and evaluation as the subset's (copies)."""

from d2retrain.core.fileio import copy_files
from d2retrain.core.logutil import run_job

snakemake = globals()["snakemake"]
run_job(snakemake.log[0], copy_files, dict(snakemake.input), dict(snakemake.output))
