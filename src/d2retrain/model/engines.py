"""The engines' model halves behind one contract: resolve an engine, load and evaluate a model folder.

An engine is two modules: its model half here (``d2retrain.model.<engine>``: initial weights with head
surgery, a predictor) and its training half (``d2retrain.train.<engine>``). Each half is registered in
one line: :data:`MODEL_ENGINES` here, ``d2retrain.train.engines.TRAIN_ENGINES`` there.
"""

import importlib.util
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import yaml

from d2retrain.core.config import allowed_values
from d2retrain.core.errors import D2RetrainError
from d2retrain.model.cococlasses import coco_category_ids
from d2retrain.model.evaluation import evaluate, write_evaluation
from d2retrain.model.exported import ExportedGraph
from d2retrain.model.predictor import ModelPredictor
from d2retrain.model.specs import ClassInfo, ModelSpec, SolverSpec, model_spec, read_classes, solver_spec

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINES",
    "MODEL_ENGINES",
    "ModelEngine",
    "PredictorFactory",
    "model_engine",
    "resolve_engine",
    "load_predictor",
    "evaluate_model",
    "served_weights",
    "read_model_config",
]


class PredictorFactory(Protocol):
    """Builds a predictor: the class of an engine's predictor (its constructor is this call)."""

    def __call__(
        self,
        weights: str | Path | None,
        spec: ModelSpec,
        solver: SolverSpec,
        num_classes: int,
        device: str = "auto",
        score_threshold: float = 0.05,
        max_detections: int = 100,
    ) -> ModelPredictor:
        """A predictor with ``weights`` loaded (None: built, weights left to the caller)."""
        ...


class ModelEngine(Protocol):
    """What an engine's model module provides (:mod:`d2retrain.model.tv`, :mod:`d2retrain.model.d2`)."""

    @property
    def make_predictor(self) -> PredictorFactory:
        """The engine's predictor class (the module's ``make_predictor``)."""
        ...

    def export_graph(
        self, predictor: ModelPredictor, export_format: str, path: Path, example: np.ndarray
    ) -> ExportedGraph:
        """Write the predictor's model as ONNX or TorchScript to ``path``; what its graph expects
        and returns (``example``: a BGR image to trace with)."""
        ...

    def initial_state(
        self, spec: ModelSpec, classes: Sequence[str], model: torch.nn.Module
    ) -> tuple[dict[str, torch.Tensor] | None, bool]:
        """Base weights for ``model`` with head surgery, and whether surgery made them COCO's rows."""
        ...


def _torchvision() -> ModelEngine:
    from d2retrain.model import tv

    return tv


def _detectron2() -> ModelEngine:
    from d2retrain.model import d2

    return d2


# Engine name -> its model half, imported when first asked for (detectron2 is optional).
MODEL_ENGINES: dict[str, Callable[[], ModelEngine]] = {"detectron2": _detectron2, "torchvision": _torchvision}


def model_engine(name: str) -> ModelEngine:
    """The model half of a resolved engine (see :func:`resolve_engine`)."""
    return MODEL_ENGINES[name]()


ENGINES = allowed_values("model.engine")  # auto and every registered engine (a test ties them)


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


def read_model_config(model_dir: str | Path) -> tuple[ModelSpec, SolverSpec]:
    """The model and solver specs saved in a model folder's ``config.yaml``; keys added since the
    folder was written take their schema defaults, so older model folders still load."""
    record = yaml.safe_load((Path(model_dir) / "config.yaml").read_text())
    model = dict(record["model"])
    return model_spec(model, model.pop("engine")), solver_spec(record["solver"])


def load_predictor(
    model_dir: str | Path,
    expected_classes: list[str] | None = None,
    device: str = "auto",
    score_threshold: float = 0.05,
    max_detections: int = 100,
) -> tuple[ModelPredictor, ClassInfo]:
    """Load a model folder once for prediction.

    Args:
        model_dir: A folder written by :func:`d2retrain.train.run.train_model`.
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
    predictor = model_engine(spec.engine).make_predictor(
        Path(model_dir) / info.model_file,
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
    reports["retrained"]["weights"] = served_weights(model_dir, info)
    baseline = _baseline_predictor(model_dir, info, device)
    if isinstance(baseline, str):
        reports["retrained"]["no_baseline"] = baseline
        logger.info("no baseline: %s", baseline)
    else:
        predictor, covered = baseline
        reports["baseline"] = evaluate(predictor, val_json, val_images, info.classes, only=covered)
    write_evaluation(reports, metrics_path, per_class_path)
    return reports


def served_weights(model_dir: str | os.PathLike[str], info: ClassInfo) -> dict:
    """Which weights a model folder serves: ``{"file", "iteration", "best"}`` (iteration: the last
    completed one, as in ``metrics.jsonl``; best: whether it is the best evaluation's)."""
    path = Path(model_dir) / "best.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    best = info.model_file == "model_best.pth"
    iteration = record.get("iteration") if best else record.get("final_iteration")
    return {"file": info.model_file, "iteration": iteration, "best": best}


def _baseline_predictor(
    model_dir: str | Path, info: ClassInfo, device: str
) -> tuple[ModelPredictor, list[str]] | str:
    """The COCO base model restricted to the classes (head surgery at iteration 0) and the classes
    it covers (those named as COCO categories), or why there is none."""
    spec, solver = read_model_config(model_dir)
    if not spec.pretrained:
        return "trained from scratch (model.weights: none): there are no base weights to compare with"
    if not spec.head_surgery:
        return "model.head_surgery is off: the base weights have no rows for these classes"
    engine = model_engine(spec.engine)
    predictor = engine.make_predictor(None, spec, solver, len(info.classes), device=device)
    state, surgery = engine.initial_state(spec, info.classes, predictor.model)
    if state is None or not surgery:
        return (
            f"the base weights are not a COCO model, or none of {', '.join(info.classes)} is one of COCO's "
            "categories (model.coco_names maps other names): they have no rows for these classes"
        )
    predictor.model.load_state_dict(state, strict=False)
    coco_ids = coco_category_ids(info.classes, spec.coco_names)
    covered = [name for name, coco_id in zip(info.classes, coco_ids, strict=True) if coco_id is not None]
    logger.info("baseline: the base weights %s on the COCO classes %s", spec.weights, ", ".join(covered))
    return predictor, covered
