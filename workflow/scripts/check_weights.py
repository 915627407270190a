"""Snakemake job: load the configured base weights into the configured model, before training."""

from d2retrain.core.logutil import run_job
from d2retrain.model.engines import check_weights

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    check_weights,
    dict(snakemake.params.model),
    list(snakemake.params.categories),
    snakemake.output[0],
)
