"""Snakemake job: merge the split of several datasets for one subset, images linked beside it."""

from d2retrain.core.logutil import run_job
from d2retrain.data.merge import MergeSource, merge_files

snakemake = globals()["snakemake"]
sources = [
    MergeSource(name, annotations, images, dict(aliases))
    for (name, images, aliases), annotations in zip(snakemake.params.sources, snakemake.input, strict=True)
]
run_job(
    snakemake.log[0], merge_files, sources, snakemake.output.json, snakemake.output.images, snakemake.threads
)
