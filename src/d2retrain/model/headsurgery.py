"""Weights: base weights and their sources, checkpoints, head surgery keeping the chosen classes' rows."""

import logging
import pickle
import urllib.error
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from d2retrain.core.errors import WeightsError

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_ZOO_SOURCES",
    "WeightsError",
    "check_pickle_source",
    "load_checkpoint",
    "load_tensor_file",
    "load_state_dict_source",
    "subset_class_rows",
    "log_surgery",
]

# Where pickled (.pkl) weights are trusted without model.trust_pickle: detectron2's model zoo.
MODEL_ZOO_SOURCES = ("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/")


def _unwrap(state: Mapping) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a ``.pth``/``.pt`` file with ``torch.load(weights_only=True)``: tensors and plain
    containers only, no code runs.

    Raises:
        WeightsError: The file holds other objects (pickled code) or is not a torch file.
    """
    try:
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(
            f"model.weights {path}: not loaded, it is not a plain tensor file ({first_line}); "
            "weights are read with torch.load(weights_only=True), which runs no code: re-save "
            "the file as a state dict (torch.save(model.state_dict(), path)) from a source you trust"
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by the training loop's CheckpointStore (weights only, no pickle code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def check_pickle_source(weights: str, trusted: bool) -> None:
    """Allow a pickled ``.pkl`` file only from detectron2's model zoo or with an explicit opt-in.

    Raises:
        WeightsError: Any other ``.pkl`` source without ``model.trust_pickle: true``.
    """
    if trusted or weights.startswith(MODEL_ZOO_SOURCES):
        return
    raise WeightsError(
        f"model.weights {weights}: a pickled .pkl file can run code when loaded, so only "
        f"detectron2 model-zoo files ({', '.join(MODEL_ZOO_SOURCES)}) are loaded as is; set "
        "model.trust_pickle: true if you trust this file, or convert it to a .pth state dict"
    )


def load_state_dict_source(weights: str, torchvision_names: bool = False) -> dict[str, torch.Tensor] | None:
    """Load base weights from ``none``, a local ``.pth``, an http(s) URL or a torchvision name.

    ``.pth`` files load with ``torch.load(weights_only=True)``: no code in them runs.

    Args:
        weights: The source.
        torchvision_names: Accept torchvision weights names such as
            ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1``.

    Returns:
        A state dict, or None for ``none``.

    Raises:
        WeightsError: The file is missing, the name unknown, or the download failed.
    """
    if weights in ("", "none"):
        return None
    if "://" not in weights and (Path(weights).suffix in (".pth", ".pt") or Path(weights).exists()):
        if not Path(weights).is_file():
            raise WeightsError(f"model.weights {weights}: no such file")
        return load_tensor_file(weights)
    url = weights if weights.startswith(("http://", "https://")) else None
    if url is None and torchvision_names:
        import torchvision

        try:
            url = torchvision.models.get_weight(weights).url
        except (ValueError, KeyError, AttributeError):
            raise WeightsError(
                f"model.weights {weights!r}: not a file, URL or torchvision weights name "
                "(e.g. MaskRCNN_ResNet50_FPN_Weights.COCO_V1)"
            ) from None
    if url is None:
        raise WeightsError(f"model.weights {weights!r}: not a file, an http(s) URL, or a known weights name")
    try:
        return _unwrap(torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True))
    except (urllib.error.URLError, OSError) as error:
        raise WeightsError(
            f"model.weights {weights}: cannot be downloaded ({error}); offline, download {url} on a "
            "connected machine and set model.weights to the local file"
        ) from None


def subset_class_rows(
    state: Mapping[str, torch.Tensor],
    layers: Mapping[str, int],
    rows: Sequence[int | None],
    own: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep, in each class-specific layer, the rows of the given classes in the given order.

    Args:
        state: A full model's state dict.
        layers: Layer name (without ``.weight``/``.bias``) -> rows per class (4 for box
            regression, 1 otherwise).
        rows: Class indices of the full model, in the new model's class order; None for a class
            the full model does not have, which keeps the new model's own (random) rows.
        own: The new model's state dict (needed when a row is None).

    Returns:
        A new state dict; other tensors are shared, not copied.
    """
    result = dict(state)
    for layer, per_class in layers.items():
        for suffix in ("weight", "bias"):
            key = f"{layer}.{suffix}"
            if key not in result:
                continue
            parts = [
                result[key][row * per_class : (row + 1) * per_class]
                if row is not None
                else _own_rows(own, key)[place * per_class : (place + 1) * per_class]
                for place, row in enumerate(rows)
            ]
            result[key] = torch.cat(parts).clone()
    return result


def _own_rows(own: Mapping[str, torch.Tensor] | None, key: str) -> torch.Tensor:
    if own is None:
        raise ValueError(f"{key}: a class without base rows needs the new model's own state")
    return own[key]


def log_surgery(classes: Sequence[str], coco_ids: Sequence[int | None]) -> None:
    """Say which classes start from which COCO category's rows, and which start at random."""
    for name, coco_id in zip(classes, coco_ids, strict=True):
        if coco_id is None:
            logger.info("head surgery: %r is not a COCO category: its class rows start at random", name)
        else:
            logger.info("head surgery: %r starts from the rows of COCO category %d", name, coco_id)
