"""Snakemake job: train (or resume) the subset's model, or one of its experiments'."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.core.mlflowlog import mlflow_settings
from d2retrain.train.run import train_from_config

if __name__ == "__main__":  # training processes (train.num_gpus > 1) import this file again
    snakemake = globals()["snakemake"]
    wildcards = snakemake.wildcards
    run_job(
        snakemake.log[0],
        train_from_config,
        model=snakemake.params.model,
        train=snakemake.params.train,
        classes=list(snakemake.params.categories),
        train_json=snakemake.input.train,
        train_images=snakemake.input.train_images,
        val_json=snakemake.input.val,
        val_images=snakemake.input.val_images,
        source_json=snakemake.input.source,
        output_dir=str(Path(snakemake.output.final).parent),
        threads=snakemake.threads,
        repeat_factors=snakemake.input.get("train__repeat"),
        serve=False,  # rule serve_model
        # read from the config, not a param: where a run is tracked does not change the model
        mlflow=mlflow_settings(
            snakemake.config["mlflow"],
            wildcards.subset,
            wildcards.get("experiment"),
            Path(snakemake.scriptdir).parents[1],
        ),
    )
