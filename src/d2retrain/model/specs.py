"""What shapes a model: engine, architecture, weights, test-time input sizes, solver and
augmentation (training jobs are :mod:`d2retrain.train.job`'s, the model folder
:mod:`d2retrain.model.folder`'s).

The specs are built from configuration sections whose defaults are filled in
(:func:`d2retrain.core.config.with_defaults`); they restate no default.
"""

import dataclasses
import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ModelSpec", "SolverSpec", "AugmentSpec", "LAUNCH_KEYS", "model_spec", "solver_spec"]

# Keys of the train section that say how many processes train, not what: left out of the solver.
LAUNCH_KEYS = ("num_gpus", "num_machines", "machine_rank", "dist_url")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which network and which starting weights.

    Attributes:
        engine: ``detectron2`` or ``torchvision`` (``auto`` is resolved before this).
        architecture: detectron2: a model-zoo config name or a config file; torchvision:
            ``maskrcnn_resnet50_fpn``, ``maskrcnn_resnet50_fpn_v2`` or ``maskrcnn_resnet18_fpn``.
        weights: ``none``, a local file, a ``detectron2://`` or http(s) URL, or a
            torchvision weights name such as ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1``.
        head_surgery: Start the class-specific layers from the base model's rows of the
            chosen COCO categories.
        roi_batch_size_per_image: Sampled regions per image for the box and mask heads
            (detectron2 ``ROI_HEADS.BATCH_SIZE_PER_IMAGE``).
        rpn_post_nms_topk_train: Proposals kept per image in training.
        rpn_post_nms_topk_test: Proposals kept per image at inference.
        min_size_test: Shortest edge of the image the network sees at evaluation and inference.
        max_size_test: Longest-edge cap at evaluation and inference.
        trust_pickle: Load pickled ``.pkl`` weights from sources other than detectron2's
            model zoo (they can run code).
        freeze_at: Fine-tuning (base weights given): backbone stages kept as loaded, detectron2's
            ``MODEL.BACKBONE.FREEZE_AT`` (0 none, 1 the stem, 2 stem and res2, ... 5 all); the
            backbone's norms are then frozen too. From scratch nothing is frozen.
        coco_names: Class name -> COCO category name, for classes named otherwise; head surgery
            and the baseline match classes to COCO by name, never by the dataset's ids.
    """

    engine: str
    architecture: str
    weights: str
    head_surgery: bool
    roi_batch_size_per_image: int
    rpn_post_nms_topk_train: int
    rpn_post_nms_topk_test: int
    min_size_test: int
    max_size_test: int
    trust_pickle: bool
    freeze_at: int
    coco_names: dict[str, str]

    @property
    def pretrained(self) -> bool:
        """Whether training starts from base weights (fine-tuning) rather than from scratch."""
        return self.weights not in ("", "none")


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """Training augmentations beyond flips and shortest-edge sizes (``train.augment``), the same for
    both engines: detectron2's ``T.*`` and torchvision's ``transforms.v2`` (see
    :mod:`d2retrain.train.augment`). All off by default.

    Attributes:
        brightness: Pixel values times a factor drawn in [1 - b, 1 + b] (0: off).
        contrast: Blend with the image mean by a factor drawn in [1 - c, 1 + c] (0: off).
        saturation: Blend with the grey image by a factor drawn in [1 - s, 1 + s] (0: off).
        crop: A random crop whose height and width are each drawn in [crop, 1] of the image's
            (detectron2's ``relative_range``); None: off.
        scale_jitter: Large-scale jitter ``(low, high)``: the image is resized to fit a square of
            side ``max(min_size_train)`` times a factor drawn in [low, high], then cropped or padded
            to that square; it replaces the shortest-edge resize in training. None: off.
    """

    brightness: float
    contrast: float
    saturation: float
    crop: float | None
    scale_jitter: tuple[float, float] | None

    @property
    def crops(self) -> bool:
        """Whether instances can be cut, so boxes are recomputed from the cropped masks."""
        return self.crop is not None or self.scale_jitter is not None


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """Solver and augmentation, with detectron2's semantics for both engines (test-time input
    sizes are the model's: :class:`ModelSpec`).

    Attributes:
        iterations: Total iterations (detectron2 ``SOLVER.MAX_ITER``).
        images_per_batch: Images per iteration, over all devices.
        base_lr: Learning rate after warmup.
        warmup_iterations: Linear warmup length (factor 0.001 -> 1).
        steps: Iterations at which the learning rate is multiplied by ``gamma``.
        gamma: Step decay factor.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        checkpoint_period: Iterations between checkpoints.
        eval_period: Iterations between AP evaluations on the val split (0: off).
        min_size_train: Shortest-edge sizes, one drawn per image.
        max_size_train: Longest-edge cap in training.
        flip: Random horizontal flip in training.
        amp: Mixed precision on a GPU (ignored on the CPU).
        seed: Seed of weights init and data order.
        clip_gradients: Per-parameter gradient L2-norm cap (0: off).
        max_loss: A loss above this (or NaN) stops training.
        keep: ``best`` or ``final``: the weights evaluation, inference and export use (see :attr:`kept`).
        patience: Evaluations without a better val segm AP after which training stops (0: never).
        augment: Colour jitter, random crop, large-scale jitter (:class:`AugmentSpec`).
    """

    iterations: int
    images_per_batch: int
    base_lr: float
    warmup_iterations: int
    steps: tuple[int, ...]
    gamma: float
    momentum: float
    weight_decay: float
    checkpoint_period: int
    eval_period: int
    min_size_train: tuple[int, ...]
    max_size_train: int
    flip: bool
    amp: bool
    seed: int
    clip_gradients: float
    max_loss: float
    keep: str
    patience: int
    augment: AugmentSpec

    @property
    def kept(self) -> str:
        """The weights a trained model folder serves: ``best`` (the best evaluation during
        training) or ``final``; without evaluations during training there is no best."""
        return "best" if self.keep == "best" and self.eval_period > 0 else "final"


def model_spec(model: dict[str, Any], engine: str) -> ModelSpec:
    """A :class:`ModelSpec` from the ``model`` section (defaults filled in) and a resolved engine."""
    values = {key: value for key, value in model.items() if key != "engine"}
    return ModelSpec(engine=engine, **values)


def solver_spec(train: dict[str, Any]) -> SolverSpec:
    """A :class:`SolverSpec` from the ``train`` section (defaults filled in)."""
    left_out = ("device", "keep_checkpoints", *LAUNCH_KEYS)  # none of them changes the model
    values = {key: value for key, value in train.items() if key not in left_out}
    augment: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in values.pop("augment", {}).items()
    }
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return SolverSpec(**fields, augment=AugmentSpec(**augment))
