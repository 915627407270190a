"""Snakemake job: each video's tracks scored against its ground truth (HOTA, MOTA, IDF1, ID switches)."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.infer.trackscore import write_tracking_table

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    write_tracking_table,
    dict(snakemake.params.videos),
    Path(snakemake.input.summary).parent / "videos",
    snakemake.output[0],
)
