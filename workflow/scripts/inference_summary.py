"""Snakemake job: one row per inferred file, problems first; the drawn files gathered for the report;
the images' predictions as one COCO dataset file."""

from pathlib import Path

from d2retrain.core.logutil import run_job
from d2retrain.infer.cocoout import write_predictions_coco
from d2retrain.infer.inputs import InputFile
from d2retrain.infer.reuse import remove_stale
from d2retrain.infer.summary import FileStatus, gather_drawn, write_summary
from d2retrain.model.folder import ModelFolder

snakemake = globals()["snakemake"]


def summarise(status_paths: list[str]) -> None:
    inference_dir = Path(snakemake.output.csv).parent
    table = write_summary(status_paths, snakemake.output.csv)
    gather_drawn(table, inference_dir, snakemake.output.drawn)
    info = ModelFolder(Path(snakemake.input.classes).parent).read_classes()
    statuses = [FileStatus(**row) for row in table.to_dict("records")]
    remove_stale(inference_dir, [InputFile(status.path, status.kind, status.name) for status in statuses])
    write_predictions_coco(statuses, inference_dir, info.classes, info.source_ids, snakemake.output.coco)


run_job(snakemake.log[0], summarise, list(snakemake.input.status))
