"""Snakemake job: the subset's experiments compared, and the best on val selected."""

from d2retrain.compare import ComparisonFiles, select_experiment
from d2retrain.core.logutil import run_job

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    select_experiment,
    snakemake.params.folders,
    snakemake.params.overrides,
    snakemake.params.variants,
    snakemake.params.metric,
    ComparisonFiles(**snakemake.output),
    title=f"Experiments of {snakemake.wildcards.subset}",
)
