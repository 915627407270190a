"""The engine and base weights a config names, checked at planning time without importing PyTorch.

The workflow calls :func:`check_model_setting` while it plans, so a mistyped path, a file that is
not a checkpoint or a detectron2 model without detectron2 stops the run before any job; whether a
URL or torchvision weights name can be fetched is found by the ``check_weights`` job, which runs
first (:func:`d2retrain.model.engines.check_weights`).
"""

import importlib.util
import logging
from pathlib import Path

from d2retrain.core.config import allowed_values
from d2retrain.core.errors import D2RetrainError, WeightsError

logger = logging.getLogger(__name__)

__all__ = ["ENGINES", "check_model_setting", "check_weights_file", "is_local_weights", "resolve_engine"]

ENGINES = allowed_values("model.engine")  # auto and every registered engine (a test ties them)
# How the files that torch.save (a zip) and pickle (detectron2's .pkl, torch's legacy format) write start.
_CHECKPOINT_STARTS = (b"PK\x03\x04", b"\x80")


def resolve_engine(name: str, architecture: str = "") -> str:
    """Turn ``auto`` into ``detectron2`` when it is importable and the architecture is not a
    torchvision name, else ``torchvision``.

    Raises:
        D2RetrainError: The name is unknown, detectron2 is asked for (by name, or by a
            detectron2 architecture with ``auto``) but missing.
    """
    available = importlib.util.find_spec("detectron2") is not None
    if name not in ENGINES:
        raise D2RetrainError(f"model.engine {name!r} is unknown; use one of {', '.join(ENGINES)}")
    if name == "auto" and not available and _detectron2_name(architecture):
        raise D2RetrainError(
            f"model.architecture {architecture!r} is a detectron2 model, and model.engine: auto found no "
            "detectron2 installed; install it from its repository (see the Dockerfile), or choose a "
            "torchvision architecture (maskrcnn_resnet50_fpn, ...)"
        )
    if name == "auto":
        return "detectron2" if available and not architecture.startswith("maskrcnn_") else "torchvision"
    if name == "detectron2" and not available:
        raise D2RetrainError(
            "model.engine is detectron2 but it is not installed; install it from its repository "
            "or set model.engine: torchvision"
        )
    return name


def _detectron2_name(architecture: str) -> bool:
    """A detectron2 model-zoo name or config file (``COCO-InstanceSegmentation/...yaml``)."""
    return architecture.endswith((".yaml", ".py")) or "/" in architecture


def is_local_weights(weights: str) -> bool:
    """Whether ``model.weights`` names a local file (not ``none``, a URL or a weights name)."""
    if weights in ("", "none") or "://" in weights:
        return False
    return Path(weights).suffix in (".pth", ".pt", ".pkl") or Path(weights).exists()


def check_weights_file(weights: str) -> None:
    """A local ``model.weights`` file exists and starts as a checkpoint does (torch.save's zip or a
    pickle); other settings are left to the ``check_weights`` job.

    Raises:
        WeightsError: No such file, or not a checkpoint.
    """
    if not is_local_weights(weights):
        return
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"model.weights {weights}: no such file; set model.weights to a checkpoint file")
    with open(path, "rb") as handle:
        start = handle.read(4)
    if not start.startswith(_CHECKPOINT_STARTS):
        raise WeightsError(
            f"model.weights {weights}: not a checkpoint (it starts with {start!r}, not as a file written by "
            "torch.save or a detectron2 .pkl); set model.weights to a checkpoint file"
        )


def check_model_setting(model: dict) -> str:
    """The planning-time checks of the ``model`` section: the engine it resolves to, and a local
    weights file (:func:`check_weights_file`).

    Args:
        model: The config's ``model`` section (defaults filled in).

    Returns:
        The engine that will train.

    Raises:
        D2RetrainError: See :func:`resolve_engine` and :func:`check_weights_file`.
    """
    engine = resolve_engine(model["engine"], model["architecture"])
    check_weights_file(str(model["weights"]))
    return engine
