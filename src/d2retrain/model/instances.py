"""What every predictor returns for one image, and what a predictor is; without PyTorch, so that an
exported model predicts through onnxruntime in a process that never imports torch."""

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

__all__ = ["Instances", "Predictor"]


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

    def take(self, keep: np.ndarray) -> "Instances":
        """The instances that ``keep`` (a boolean mask or indices) selects, in order."""
        if keep.dtype == bool and keep.all():
            return self
        return Instances(self.boxes[keep], self.scores[keep], self.classes[keep], self.masks[keep])


class Predictor(Protocol):
    """A loaded model: call it on a BGR uint8 image, or on several at once."""

    def __call__(self, image_bgr: np.ndarray) -> Instances:
        """Predict one image."""
        ...

    def predict_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Instances]:
        """Predict several images in one forward pass (faster on a GPU, and on a CPU too)."""
        ...
