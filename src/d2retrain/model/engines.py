"""The engines' model halves behind one contract: resolve an engine, load and evaluate a model folder.

An engine is two modules: its model half here (``d2retrain.model.<engine>``: initial weights with head
surgery, a predictor) and its training half (``d2retrain.train.<engine>``). Each half is registered in
one line: :data:`MODEL_ENGINES` here, ``d2retrain.train.engines.TRAIN_ENGINES`` there.
"""

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from d2retrain.core.config import with_defaults
from d2retrain.core.errors import WeightsError
from d2retrain.core.fileio import write_text_atomic
from d2retrain.core.mlflowlog import MlflowRun
from d2retrain.model.cococlasses import coco_category_ids
from d2retrain.model.evaluation import evaluate, write_evaluation
from d2retrain.model.exported import ExportedGraph
from d2retrain.model.folder import ClassInfo, ModelFolder
from d2retrain.model.predictor import ModelPredictor
from d2retrain.model.sources import ENGINES, resolve_engine
from d2retrain.model.specs import ModelSpec, model_spec

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINES",
    "MODEL_ENGINES",
    "ModelEngine",
    "PredictorFactory",
    "model_engine",
    "resolve_engine",
    "check_weights",
    "load_predictor",
    "evaluate_model",
    "EvalSplit",
    "evaluate_splits",
    "read_model_config",
]


class PredictorFactory(Protocol):
    """Builds a predictor: the class of an engine's predictor (its constructor is this call)."""

    def __call__(
        self,
        weights: str | Path | None,
        spec: ModelSpec,
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


def read_model_config(model_dir: str | Path) -> ModelSpec:
    """The model spec saved in a model folder's ``config.yaml``; keys added since the folder was
    written take their schema defaults, so older model folders still load."""
    model = with_defaults({"model": ModelFolder(model_dir).read_config()["model"]})["model"]
    return model_spec(model, model["engine"])


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
    folder = ModelFolder(model_dir)
    info = folder.read_classes(expected_classes)
    spec = read_model_config(model_dir)
    resolve_engine(spec.engine)
    predictor = model_engine(spec.engine).make_predictor(
        folder.served_weights(),
        spec,
        len(info.classes),
        device=device,
        score_threshold=score_threshold,
        max_detections=max_detections,
    )
    return predictor, info


@dataclasses.dataclass(frozen=True)
class EvalSplit:
    """A split to evaluate a model on, and where its evaluation goes.

    Attributes:
        name: ``val`` or ``test`` (the MLflow metrics' prefix and artifact folder).
        annotations: The split's COCO annotations.
        images: The split's image folder.
        metrics: ``metrics.json`` to write.
        per_class: The per-class CSV to write.
    """

    name: str
    annotations: str
    images: str
    metrics: str
    per_class: str


def evaluate_model(
    model_dir: str,
    val_json: str,
    val_images: str,
    classes: list[str],
    metrics_path: str,
    per_class_path: str,
    device: str = "auto",
    threads: int = 1,
    score_threshold: float = 0.5,
) -> dict:
    """Evaluate a model folder on its val split and write the metrics files
    (:func:`evaluate_splits` with that one split, untracked).

    Returns:
        ``{"retrained": report}``, and ``"baseline"`` when there is one.
    """
    split = EvalSplit("val", val_json, val_images, metrics_path, per_class_path)
    return evaluate_splits(model_dir, [split], classes, device, threads, score_threshold)["val"]


def evaluate_splits(
    model_dir: str,
    splits: Sequence[EvalSplit],
    classes: list[str],
    device: str = "auto",
    threads: int = 1,
    score_threshold: float = 0.5,
    track: bool = False,
) -> dict[str, dict]:
    """Evaluate a model folder on each split (val, and test when there is one), the model loaded
    once, and write each split's metrics files; warn (in the log and in ``warnings`` of the report)
    when the model finds nothing at ``score_threshold`` (the inference threshold) on any image of a
    split. With ``track`` and a training tracked in MLflow, the AP goes to its run too
    (``<split>_segm_AP``..., the files as artifacts under ``<split>/``).

    Returns:
        Per split name, ``{"retrained": report}``, and ``"baseline"`` when there is one.
    """
    torch.set_num_threads(max(1, threads))
    predictor, info = load_predictor(model_dir, classes, device=device)
    baseline = _baseline_predictor(model_dir, info, device)
    if isinstance(baseline, str):
        logger.info("no baseline: %s", baseline)
    run = MlflowRun.attach(ModelFolder(model_dir).checkpoints) if track else None
    served = ModelFolder(model_dir).served_record()
    evaluations = {}
    for split in splits:
        retrained = evaluate(
            predictor, split.annotations, split.images, info.classes, found_at=score_threshold
        )
        reports = {"retrained": retrained | {"warnings": _found_nothing(retrained, split.name)}}
        reports["retrained"]["weights"] = served
        if isinstance(baseline, str):
            reports["retrained"]["no_baseline"] = baseline
        else:
            base_predictor, covered = baseline
            reports["baseline"] = evaluate(
                base_predictor, split.annotations, split.images, info.classes, only=covered
            )
        write_evaluation(reports, split.metrics, split.per_class)
        if run is not None:
            final = {
                f"{split.name}_{kind}_{key}": retrained[kind][key]
                for kind in ("segm", "bbox")
                for key in ("AP", "AP50")
            }
            run.log_metrics(final, served.get("iteration") or 0)
            run.log_artifacts([split.metrics, split.per_class], folder=split.name)
        evaluations[split.name] = reports
    if run is not None:
        run.flush()
    return evaluations


def _found_nothing(report: dict, split: str = "val") -> list[str]:
    """The warning when the model finds nothing at the inference threshold on any image of a split."""
    found = report["found"]
    if found["images"] or not found["val_images"]:
        return []
    warning = (
        f"the model finds nothing at score >= {found['score_threshold']:g} on any of the "
        f"{found['val_images']} {split} images (segm AP {report['segm']['AP']:.3f}): train longer "
        f"(train.iterations), start from COCO weights (model.weights), check that the {split} images "
        "show the classes, or lower inference.score_threshold"
    )
    logger.warning(warning)
    return [warning]


def _baseline_predictor(
    model_dir: str | Path, info: ClassInfo, device: str
) -> tuple[ModelPredictor, list[str]] | str:
    """The COCO base model restricted to the classes (head surgery at iteration 0) and the classes
    it covers (those named as COCO categories), or why there is none."""
    spec = read_model_config(model_dir)
    if not spec.pretrained:
        return "trained from scratch (model.weights: none): there are no base weights to compare with"
    if not spec.head_surgery:
        return "model.head_surgery is off: the base weights have no rows for these classes"
    engine = model_engine(spec.engine)
    predictor = engine.make_predictor(None, spec, len(info.classes), device=device)
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


def check_weights(model: dict, classes: Sequence[str], output: str | Path | None = None) -> dict:
    """Load the configured base weights into the configured architecture as training will (the
    engine's :meth:`ModelEngine.initial_state`, head surgery included): a bad file, an unreachable
    URL or weights of another architecture fail here, in seconds, before training.

    Args:
        model: The config's ``model`` section.
        classes: Class names in model order.
        output: Where to write the result as JSON (None: not written).

    Returns:
        The engine, the weights, the tensors loaded and left at random, whether head surgery ran.

    Raises:
        WeightsError: The weights cannot be found, fetched or loaded.
        D2RetrainError: The engine cannot be used.
    """
    model = with_defaults({"model": model})["model"]
    engine = resolve_engine(model["engine"], model["architecture"])
    spec = model_spec(model, engine)
    built = model_engine(engine).make_predictor(None, spec, len(classes), device="cpu")
    state, surgery = model_engine(engine).initial_state(spec, classes, built.model)
    result = {"engine": engine, "weights": spec.weights, "loaded": 0, "random": 0, "head_surgery": surgery}
    if state is not None:
        missing = built.model.load_state_dict(state, strict=False).missing_keys
        if not set(state) & set(built.model.state_dict()):
            raise WeightsError(
                f"model.weights {spec.weights}: none of its tensors belongs to {spec.architecture}; "
                "set model.weights to weights of that architecture"
            )
        result |= {"loaded": len(state), "random": len(missing)}
    logger.info(
        "model.weights %s load into %s (%s engine): %d tensors, %d left at random%s",
        spec.weights, spec.architecture, engine, result["loaded"], result["random"],
        ", COCO head rows by class name" if surgery else "",
    )  # fmt: skip
    if output is not None:
        write_text_atomic(output, json.dumps(result, indent=1) + "\n")
    return result
