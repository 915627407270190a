"""Snakemake job: write the demo dataset."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.data.demo import write_demo_dataset

snakemake = globals()["snakemake"]
params = snakemake.params
run_job(
    snakemake.log[0],
    write_demo_dataset,
    Path(snakemake.output.video).parents[1],
    seed=params.seed,
    train=params.train,
    val=params.val,
    video_frames=params.video_frames,
    test=params.test,
)
