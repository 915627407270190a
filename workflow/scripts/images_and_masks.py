"""Snakemake job: link a split's images and render its mask PNGs."""

from d2retrain.core.logutil import run_job
from d2retrain.data.masks import copy_images_and_masks

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    copy_images_and_masks,
    snakemake.input.annotations,
    snakemake.input.images,
    snakemake.output.images,
    snakemake.output.masks,
    threads=snakemake.threads,
)
