"""Snakemake job: COCO AP of the subset's model (or an experiment's) on its val split, and on its
test split when the subset has one (the model loaded once)."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.model.engines import EvalSplit, evaluate_splits

snakemake = globals()["snakemake"]
inputs, outputs = snakemake.input, snakemake.output
splits = [EvalSplit("val", inputs.val, inputs.val_images, outputs.metrics, outputs.per_class)]
if "test" in dict(inputs.items()):  # a Namedlist: `in` would look among the values
    splits.append(
        EvalSplit("test", inputs.test, inputs.test_images, outputs.test_metrics, outputs.test_per_class)
    )
run_job(
    snakemake.log[0],
    evaluate_splits,
    str(Path(inputs.weights).parent),
    splits,
    list(snakemake.params.categories),
    device=snakemake.params.device,
    threads=snakemake.threads,
    score_threshold=snakemake.params.score_threshold,
    # read from the config, not a param: where a run is tracked does not change the AP
    track=bool(snakemake.config["mlflow"]["tracking_uri"]),
)
