"""Train a model folder: a job from the config sections, its engine's training half, the folder's files."""

import dataclasses
import json
import logging
from pathlib import Path

import torch
import yaml

from d2retrain.core.config import check_moved_keys, with_defaults
from d2retrain.core.fileio import atomic_open, write_bytes_atomic, write_text_atomic
from d2retrain.core.mlflowlog import MlflowRun, MlflowSettings
from d2retrain.data.catalog import check_class_list, source_category_ids
from d2retrain.model.engines import resolve_engine
from d2retrain.model.folder import ClassInfo, ModelFolder
from d2retrain.model.headsurgery import load_checkpoint
from d2retrain.model.specs import model_spec, solver_spec
from d2retrain.train.engines import train_engine
from d2retrain.train.job import TrainJob, distributed_spec, fingerprint
from d2retrain.train.loop import BEST_METRIC, CheckpointStore, plot_metrics

logger = logging.getLogger(__name__)

__all__ = ["train_model", "train_from_config"]


def train_model(job: TrainJob, serve: bool = True) -> None:
    """Train (resuming a killed run of the same job) and write the model folder.

    Writes the :class:`~d2retrain.model.folder.ModelFolder` ``job.output_dir``: the last iteration's
    weights, the best evaluation's (when there were evaluations during training), the best record,
    classes, config, metrics and loss plot, and last (with ``serve``) the served weights
    (``train.keep``'s choice, :meth:`ModelFolder.serve_kept`); checkpoints stay beside them.

    Raises:
        D2RetrainError: Bad input, unusable weights or a diverged loss.
    """
    key = fingerprint(job)
    job.distributed.check(job.solver.images_per_batch)
    try:
        final = train_engine(job.model.engine).train(job, key)
    except BaseException:
        _end_tracking(job, key, "FAILED")
        raise
    if job.distributed.machine_rank != 0:
        return  # machine 0 writes the model folder
    folder = ModelFolder(job.output_dir)
    with atomic_open(folder.final_weights, durable=True) as handle:
        torch.save({"model": load_checkpoint(final)["model"]}, handle)
    served = _write_best(job, key, folder)
    write_text_atomic(folder.config_file, yaml.safe_dump(_config_record(job), sort_keys=False))
    write_bytes_atomic(folder.metrics, folder.live_metrics.read_bytes())
    plot_metrics(folder.metrics, folder.loss_plot, f"{', '.join(job.classes)} ({job.model.engine})")
    info = ClassInfo(
        list(job.classes),
        list(job.source_ids),
        job.model.engine,
        job.model.architecture,
        job.model.weights,
        key,
        served.name,
    )
    folder.write_classes(info)
    _end_tracking(
        job, key, "FINISHED", [folder.metrics, folder.loss_plot, folder.config_file, folder.best_file]
    )
    if serve:  # the workflow serves in a rule of its own (serve_model), from the folder's records
        folder.serve_kept()


def _end_tracking(job: TrainJob, key: str, status: str, artifacts: list[Path] | None = None) -> None:
    """The MLflow run of this training (when tracked, on machine 0): the folder's records as
    artifacts, then ended; a run of an earlier training, or one already ended, is left alone."""
    if job.mlflow is None or job.distributed.machine_rank != 0:
        return
    run = MlflowRun.attach(job.checkpoint_dir, key)
    if run is not None and run.is_running():
        run.log_artifacts(artifacts or [])
        run.finish(status)


def _write_best(job: TrainJob, key: str, folder: ModelFolder) -> Path:
    """``model_best.pth`` and ``best.json`` from the checkpoint store; returns the weights the
    folder serves (``train.keep``)."""
    store = CheckpointStore(job.checkpoint_dir, key)
    iterations = store.finished_run()
    best = store.best_weights()
    record: dict = {"iteration": None, "metric": BEST_METRIC, "value": None}
    if best is not None and store.best is not None:
        write_bytes_atomic(folder.best_weights, best.read_bytes())
        record = {field: store.best[field] for field in ("iteration", "metric", "value")}
    else:
        folder.best_weights.unlink(missing_ok=True)
    served = folder.best_weights if job.solver.kept == "best" and best is not None else folder.final_weights
    record["final_iteration"] = iterations  # iterations done, as in metrics.jsonl
    record["kept"] = served.name
    record["served"] = folder.served.name
    folder.write_best(record)
    if served == folder.best_weights:
        logger.info(
            "the model serves the best evaluation: %s %.4f at iteration %d",
            BEST_METRIC,
            record["value"],
            record["iteration"],
        )
    return served


def train_from_config(
    model: dict,
    train: dict,
    classes: list[str],
    train_json: str,
    train_images: str,
    val_json: str,
    val_images: str,
    source_json: str,
    output_dir: str,
    threads: int = 1,
    repeat_factors: str | None = None,
    serve: bool = True,
    mlflow: MlflowSettings | None = None,
) -> None:
    """Build a :class:`TrainJob` from the ``model`` and ``train`` config sections and run it.

    Args:
        model: The ``model`` section (schema defaults fill what is missing).
        train: The ``train`` section (the same).
        classes: Class names in model order.
        train_json: Filtered, balanced training annotations.
        train_images: Training image folder.
        val_json: Filtered validation annotations.
        val_images: Validation image folder.
        source_json: The unfiltered training annotations (the classes' original ids).
        output_dir: The model folder.
        threads: CPU threads.
        repeat_factors: ``balance: repeat``'s factor file (both engines sample by it), or None.
        serve: Write the served weights (the workflow's serve_model rule does it instead).
        mlflow: Track the training in this MLflow run (None: no tracking).

    Raises:
        D2RetrainError: Bad configuration or input, unusable weights, or a diverged loss.
    """
    check_moved_keys({"model": model, "train": train}, "train_from_config")
    config = with_defaults({"model": model, "train": train})
    model, train = config["model"], config["train"]
    engine = resolve_engine(model["engine"], model["architecture"])
    for annotations in (train_json, val_json):
        check_class_list(annotations, classes)
    job = TrainJob(
        train_json=train_json,
        train_images=train_images,
        val_json=val_json,
        val_images=val_images,
        classes=tuple(classes),
        source_ids=source_category_ids(source_json, classes),
        model=model_spec(model, engine),
        solver=solver_spec(train),
        output_dir=output_dir,
        device=train["device"],
        threads=threads,
        distributed=distributed_spec(train),
        repeat_factors=repeat_factors,
        keep_checkpoints=train["keep_checkpoints"],
        mlflow=mlflow,
    )
    logger.info("training %s with the %s engine (%s)", ", ".join(classes), engine, job.model.architecture)
    train_model(job, serve)


def _config_record(job: TrainJob) -> dict:
    return {
        "model": dataclasses.asdict(job.model),
        "solver": json.loads(json.dumps(dataclasses.asdict(job.solver))),  # tuples as lists
        "classes": list(job.classes),
        "train": {"annotations": job.train_json, "images": job.train_images},
        "val": {"annotations": job.val_json, "images": job.val_images},
    }
