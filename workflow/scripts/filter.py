"""Snakemake job: filter one split to the subset's categories."""

from d2retrain.core.logutil import run_job
from d2retrain.data.filtering import FilterOptions
from d2retrain.data.prepare import filter_file

snakemake = globals()["snakemake"]
params = snakemake.params
options = FilterOptions(
    min_area=params.min_area, drop_crowd=params.drop_crowd, keep_empty_images=params.keep_empty_images
)
run_job(
    snakemake.log[0],
    filter_file,
    snakemake.input[0],
    snakemake.output[0],
    params.categories,
    options,
    snakemake.threads,
)
