"""Snakemake job: the model card of the subset's model (Markdown, and HTML for the report)."""

from pathlib import Path

from d2retrain.card import CardInputs, write_model_card
from d2retrain.core.logutil import run_job

snakemake = globals()["snakemake"]
inputs = CardInputs(
    model_dir=str(Path(snakemake.input.classes).parent),
    metrics=snakemake.input.metrics,
    per_class=snakemake.input.per_class,
    counts=snakemake.input.counts,
    data={"train": snakemake.input.train, "val": snakemake.input.val},
    datasets=dict(snakemake.params.datasets),
)
run_job(
    snakemake.log[0],
    write_model_card,
    snakemake.wildcards.subset,
    inputs,
    snakemake.output.card,
    snakemake.output.html,
    # read from the config, not a param: where a run is tracked does not change the card
    track=bool(snakemake.config["mlflow"]["tracking_uri"]),
)
