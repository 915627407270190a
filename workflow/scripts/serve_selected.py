"""Snakemake job: the selected variant's model and evaluation as the subset's (copies)."""

from d2retrain.compare import serve_selected
from d2retrain.core.logutil import run_job

snakemake = globals()["snakemake"]
run_job(snakemake.log[0], serve_selected, dict(snakemake.input), dict(snakemake.output))
