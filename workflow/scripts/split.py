"""Snakemake job: split a dataset given as one file into train and val, once for every subset."""

from d2retrain.core.logutil import run_job
from d2retrain.data.split import split_file

snakemake = globals()["snakemake"]
run_job(
    snakemake.log[0],
    split_file,
    snakemake.input[0],
    snakemake.output.train,
    snakemake.output.val,
    snakemake.params.fraction,
    snakemake.params.seed,
    snakemake.output.get("test"),
    test_fraction=snakemake.params.get("test_fraction", 0.0),
)
