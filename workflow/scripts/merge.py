"""Snakemake job: merge the split of several datasets for one subset, images linked beside it."""

from d2retrain.core.logutil import run_job
from d2retrain.data.merge import MergeSource, merge_files

snakemake = globals()["snakemake"]
sources = [
    MergeSource(name, annotations, images, dict(aliases))
    for (name, images, aliases), annotations in zip(
        snakemake.params.sources, snakemake.input.annotations, strict=True
    )
]
other_split = [
    MergeSource(name, annotations, images)
    for (name, images), annotations in zip(
        snakemake.params.other_split, snakemake.input.other_split, strict=True
    )
]
run_job(
    snakemake.log[0],
    merge_files,
    sources,
    snakemake.output.json,
    snakemake.output.images,
    snakemake.threads,
    other_split,
)
