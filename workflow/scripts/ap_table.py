"""Snakemake job: the per-class AP table (baseline vs retrained) of the report."""

from d2retrain.core.logutil import run_job
from d2retrain.report import write_ap_table

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    write_ap_table,
    snakemake.input.metrics,
    snakemake.input.per_class,
    snakemake.output[0],
    title=f"AP of {snakemake.wildcards.subset}",
)
