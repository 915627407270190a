"""Snakemake job: one row per inferred file, problems first; the drawn files gathered for the report."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.infer.summary import gather_drawn, write_summary

snakemake = globals()["snakemake"]


def summarise(status_paths: list[str]) -> None:
    table = write_summary(status_paths, snakemake.output.csv)
    gather_drawn(table, Path(snakemake.output.csv).parent, snakemake.output.drawn)


run_job(snakemake.log[0], summarise, list(snakemake.input.status))
