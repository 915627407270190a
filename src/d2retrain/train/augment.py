"""``train.augment`` for both engines: detectron2's ``T.*`` augmentations and torchvision's
``transforms.v2``, from one :class:`~d2retrain.model.specs.AugmentSpec`, side by side.

Both apply, in this order: the random crop (before any resize, as detectron2's ``DatasetMapper``
inserts it), the large-scale jitter (resize to fit a square of side ``max(min_size_train)`` times a
random factor, then crop or pad to that square), then the colour jitter. Horizontal flips and the
shortest-edge sizes stay where they were (``train.flip``, ``min_size_train``). After a crop each
instance's box is recomputed from its cropped mask and instances left without pixels are dropped
(detectron2's ``recompute_boxes``), so boxes and masks stay aligned.
"""

import dataclasses
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional

from d2retrain.model.specs import AugmentSpec, SolverSpec

__all__ = ["jitter_size", "torchvision_train_sizes", "TorchvisionAugment", "detectron2_augmentations"]

PAD_VALUE = 128  # image padding of the large-scale jitter (detectron2's FixedSizeCrop default)


def jitter_size(solver: SolverSpec) -> int:
    """Side of the square the large-scale jitter resizes to: the largest training size."""
    return max(solver.min_size_train)


def torchvision_train_sizes(solver: SolverSpec) -> SolverSpec:
    """The solver the torchvision model is built with for training: under large-scale jitter the
    samples are already squares of :func:`jitter_size`, which the model's own resize then keeps."""
    if solver.augment.scale_jitter is None:
        return solver
    side = jitter_size(solver)
    return dataclasses.replace(solver, min_size_train=(side,), max_size_train=side)


class _RelativeRandomCrop(v2.Transform):
    """A crop whose height and width are each a fraction drawn in [low, 1] of the image's, at a random
    place (detectron2's ``RandomCrop("relative_range", (low, low))``)."""

    def __init__(self, low: float) -> None:
        super().__init__()
        self.low = low

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        fraction_h, fraction_w = self.low + torch.rand(2).numpy() * (1 - self.low)
        crop_h, crop_w = max(1, int(height * fraction_h + 0.5)), max(1, int(width * fraction_w + 0.5))
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(functional.crop, inpt, **params)


class TorchvisionAugment:
    """The torchvision engine's ``train.augment``: a ``transforms.v2`` pipeline on one training
    sample, random but reproducible: the same ``key`` gives the same result (the sample's global
    position, so that a resumed run reads the same augmented images)."""

    def __init__(self, solver: SolverSpec) -> None:
        spec = solver.augment
        steps: list[v2.Transform] = []
        if spec.crop is not None:
            steps.append(_RelativeRandomCrop(spec.crop))
        if spec.scale_jitter is not None:
            side = jitter_size(solver)
            steps += [
                v2.ScaleJitter((side, side), tuple(spec.scale_jitter)),
                v2.RandomCrop(side, pad_if_needed=True, fill={tv_tensors.Image: PAD_VALUE, "others": 0}),
            ]
        if spec.brightness or spec.contrast or spec.saturation:
            steps.append(v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation))
        self.spec: AugmentSpec = spec
        self.pipeline = v2.Compose(steps) if steps else None

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, labels: torch.Tensor, key: list[int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Augment one sample.

        Args:
            image: RGB uint8 HWC.
            boxes: xyxy float32 (N, 4).
            masks: uint8 (N, H, W).
            labels: int64 (N,).
            key: Seed of this sample's random draws.

        Returns:
            The image as uint8 CHW and the target (``boxes``, ``labels``, ``masks``).
        """
        picture = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(np.ascontiguousarray(boxes)), format="XYXY", canvas_size=image.shape[:2]
            ),
            "masks": tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(masks))),
            "labels": labels,
        }
        if self.pipeline is None:
            return picture.as_subclass(torch.Tensor), _plain(target)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
            picture, target = self.pipeline(picture, target)
        if self.spec.crops:
            keep = target["masks"].flatten(1).amax(1) > 0
            target = {name: value[keep] for name, value in target.items()}
            target["boxes"] = masks_to_boxes(target["masks"]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        return picture.as_subclass(torch.Tensor), _plain(target)


def _plain(target: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {name: value.as_subclass(torch.Tensor) for name, value in target.items()}


def detectron2_augmentations(solver: SolverSpec) -> tuple[list, bool]:
    """detectron2's training augmentations for ``solver`` (what its ``DatasetMapper`` builds from
    ``INPUT.*``, plus ``train.augment``), and whether boxes are recomputed from masks."""
    from detectron2.data import transforms as T  # noqa: N812  (detectron2's own spelling)

    spec = solver.augment
    augmentations: list = []
    if spec.crop is not None:
        augmentations.append(T.RandomCrop("relative_range", (spec.crop, spec.crop)))
    if spec.scale_jitter is not None:
        side = jitter_size(solver)
        low, high = spec.scale_jitter
        augmentations += [
            T.ResizeScale(low, high, side, side),
            T.FixedSizeCrop((side, side), pad_value=PAD_VALUE),
        ]
    else:
        augmentations.append(
            T.ResizeShortestEdge(solver.min_size_train, solver.max_size_train, sample_style="choice")
        )
    if solver.flip:
        augmentations.append(T.RandomFlip(horizontal=True, vertical=False))
    for amount, kind in (
        (spec.brightness, T.RandomBrightness),
        (spec.contrast, T.RandomContrast),
        (spec.saturation, T.RandomSaturation),
    ):
        if amount:
            augmentations.append(kind(1 - amount, 1 + amount))
    return augmentations, spec.crops
