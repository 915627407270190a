"""One interface over both engines: train a model folder, load its predictor, evaluate it."""

import dataclasses
import importlib.util
import logging
from pathlib import Path

import torch
import yaml

from d2retrain.errors import D2RetrainError
from d2retrain.evaluation import evaluate, write_evaluation
from d2retrain.fileio import atomic_open, write_bytes_atomic, write_text_atomic
from d2retrain.headsurgery import load_checkpoint
from d2retrain.predictor import Predictor
from d2retrain.trainloop import plot_metrics
from d2retrain.trainspec import (
    ClassInfo,
    ModelSpec,
    SolverSpec,
    TrainJob,
    check_class_list,
    fingerprint,
    read_classes,
    source_category_ids,
    write_classes,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINES",
    "resolve_engine",
    "train_model",
    "train_from_config",
    "load_predictor",
    "evaluate_model",
    "read_model_config",
]

ENGINES = ("auto", "detectron2", "torchvision")


def resolve_engine(name: str, architecture: str = "") -> str:
    """Turn ``auto`` into ``detectron2`` when it is importable and the architecture is not a
    torchvision name, else ``torchvision``.

    Raises:
        D2RetrainError: The name is unknown, or detectron2 is asked for but missing.
    """
    available = importlib.util.find_spec("detectron2") is not None
    if name == "auto":
        return "detectron2" if available and not architecture.startswith("maskrcnn_") else "torchvision"
    if name not in ENGINES:
        raise D2RetrainError(f"model.engine {name!r} is unknown; use one of {', '.join(ENGINES)}")
    if name == "detectron2" and not available:
        raise D2RetrainError(
            "model.engine is detectron2 but it is not installed; install it from its repository "
            "or set model.engine: torchvision"
        )
    return name


def _engine_module(engine: str):
    if engine == "detectron2":
        from d2retrain import d2_engine

        return d2_engine
    from d2retrain import tv_engine

    return tv_engine


def train_model(job: TrainJob) -> None:
    """Train (resuming a killed run of the same job) and write the model folder.

    Writes ``model_final.pth``, ``classes.json``, ``config.yaml``, ``metrics.jsonl`` and
    ``loss.png`` into ``job.output_dir``; checkpoints stay in ``checkpoints/`` beside them.

    Raises:
        D2RetrainError: Bad input, unusable weights or a diverged loss.
    """
    key = fingerprint(job)
    job.distributed.check(job.solver.images_per_batch)
    final = _engine_module(job.model.engine).train(job, key)
    if job.distributed.machine_rank != 0:
        return  # machine 0 writes the model folder
    output = Path(job.output_dir)
    with atomic_open(output / "model_final.pth", durable=True) as handle:
        torch.save({"model": load_checkpoint(final)["model"]}, handle)
    write_text_atomic(output / "config.yaml", yaml.safe_dump(_config_record(job), sort_keys=False))
    live_metrics = job.checkpoint_dir / "metrics.jsonl"
    write_bytes_atomic(output / "metrics.jsonl", live_metrics.read_bytes())
    plot_metrics(
        output / "metrics.jsonl", output / "loss.png", f"{', '.join(job.classes)} ({job.model.engine})"
    )
    info = ClassInfo(
        list(job.classes),
        list(job.source_ids),
        job.model.engine,
        job.model.architecture,
        job.model.weights,
        key,
    )
    write_classes(output / "classes.json", info)


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
) -> None:
    """Build a :class:`TrainJob` from the ``model`` and ``train`` config sections and run it.

    Args:
        model: The ``model`` section (schema defaults fill what is missing).
        train: The ``train`` section.
        classes: Class names in model order.
        train_json: Filtered, balanced training annotations.
        train_images: Training image folder.
        val_json: Filtered validation annotations.
        val_images: Validation image folder.
        source_json: The unfiltered training annotations (the classes' original ids).
        output_dir: The model folder.
        threads: CPU threads.

    Raises:
        D2RetrainError: Bad configuration or input, unusable weights, or a diverged loss.
    """
    from d2retrain.settings import distributed_spec, model_spec, section_defaults, solver_spec

    model = section_defaults("model") | model
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
        device=(section_defaults("train") | train)["device"],
        threads=threads,
        distributed=distributed_spec(train),
    )
    logger.info("training %s with the %s engine (%s)", ", ".join(classes), engine, job.model.architecture)
    train_model(job)


def _config_record(job: TrainJob) -> dict:
    return {
        "model": dataclasses.asdict(job.model),
        "solver": {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(job.solver).items()
        },
        "classes": list(job.classes),
        "train": {"annotations": job.train_json, "images": job.train_images},
        "val": {"annotations": job.val_json, "images": job.val_images},
    }


def read_model_config(model_dir: str | Path) -> tuple[ModelSpec, SolverSpec]:
    """The model and solver specs saved in a model folder's ``config.yaml``; keys added since the
    folder was written take their schema defaults, so older model folders still load."""
    from d2retrain.settings import model_spec, solver_spec

    record = yaml.safe_load((Path(model_dir) / "config.yaml").read_text())
    model = dict(record["model"])
    return model_spec(model, model.pop("engine")), solver_spec(record["solver"])


def load_predictor(
    model_dir: str | Path,
    expected_classes: list[str] | None = None,
    device: str = "auto",
    score_threshold: float = 0.05,
    max_detections: int = 100,
) -> tuple[Predictor, ClassInfo]:
    """Load a model folder once for prediction.

    Args:
        model_dir: A folder written by :func:`train_model`.
        expected_classes: Refuse a model trained for other classes.
        device: ``auto``, ``cpu`` or ``cuda``.
        score_threshold: Lowest score kept.
        max_detections: Most instances per image.

    Returns:
        The predictor and the model's class information.

    Raises:
        D2RetrainError: No ``classes.json``, other classes, or an engine not installed.
    """
    info = read_classes(model_dir, expected_classes)
    spec, solver = read_model_config(model_dir)
    resolve_engine(spec.engine)
    predictor = _predictor_class(spec.engine)(
        Path(model_dir) / "model_final.pth",
        spec,
        solver,
        len(info.classes),
        device=device,
        score_threshold=score_threshold,
        max_detections=max_detections,
    )
    return predictor, info


def evaluate_model(
    model_dir: str,
    val_json: str,
    val_images: str,
    classes: list[str],
    metrics_path: str,
    per_class_path: str,
    device: str = "auto",
    threads: int = 1,
) -> dict:
    """Evaluate a model folder on a validation split and write the metrics files.

    Returns:
        ``{"retrained": report}``.
    """
    torch.set_num_threads(max(1, threads))
    predictor, info = load_predictor(model_dir, classes, device=device)
    reports = {"retrained": evaluate(predictor, val_json, val_images, info.classes)}
    baseline = _baseline_predictor(model_dir, info, device)
    if baseline is not None:
        reports["baseline"] = evaluate(baseline, val_json, val_images, info.classes)
    write_evaluation(reports, metrics_path, per_class_path)
    return reports


def _predictor_class(engine: str) -> type:
    module = _engine_module(engine)
    return module.Detectron2Predictor if engine == "detectron2" else module.TorchvisionPredictor


def _baseline_predictor(model_dir: str | Path, info: ClassInfo, device: str) -> Predictor | None:
    """The COCO base model restricted to the classes (head surgery at iteration 0), or None
    when the base weights are not a COCO model of these categories."""
    spec, solver = read_model_config(model_dir)
    if spec.weights in ("", "none") or not spec.head_surgery:
        return None
    predictor = _predictor_class(spec.engine)(None, spec, solver, len(info.classes), device=device)
    state, surgery = _engine_module(spec.engine).initial_state(spec, info.source_ids, predictor.model)
    if not surgery:
        return None
    predictor.model.load_state_dict(state, strict=False)
    logger.info("baseline: the base weights %s restricted to %s", spec.weights, ", ".join(info.classes))
    return predictor
