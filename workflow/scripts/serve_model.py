"""Snakemake job: the subset's served weights (model.pth), a hard link to those training kept."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.model.folder import ModelFolder

snakemake = globals()["snakemake"]
run_job(snakemake.log[0], ModelFolder(Path(snakemake.output.served).parent).serve_kept)
