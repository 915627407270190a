"""Snakemake job: COCO AP of the subset's model (or an experiment's) on its val or test split."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.model.engines import evaluate_model

snakemake = globals()["snakemake"]
split = "test" if Path(snakemake.output.metrics).name.startswith("test_") else "val"
run_job(
    snakemake.log[0],
    evaluate_model,
    str(Path(snakemake.input.weights).parent),
    snakemake.input.val,
    snakemake.input.val_images,
    list(snakemake.params.categories),
    snakemake.output.metrics,
    snakemake.output.per_class,
    device=snakemake.params.device,
    threads=snakemake.threads,
    score_threshold=snakemake.params.score_threshold,
    # read from the config, not a param: where a run is tracked does not change the AP
    track_as=split if snakemake.config["mlflow"]["tracking_uri"] else None,
)
