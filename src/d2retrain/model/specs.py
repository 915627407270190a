"""What shapes a model: engine, architecture, weights, solver; its fingerprint and classes.json."""

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d2retrain.core.config import section_defaults
from d2retrain.core.errors import CategoryError, D2RetrainError
from d2retrain.core.fileio import file_digest, write_text_atomic
from d2retrain.data.coco import read_coco
from d2retrain.data.filtering import resolve_categories

logger = logging.getLogger(__name__)

__all__ = [
    "ModelSpec",
    "SolverSpec",
    "AugmentSpec",
    "DistributedSpec",
    "LAUNCH_KEYS",
    "TrainJob",
    "ClassInfo",
    "ModelFolderError",
    "fingerprint",
    "lr_factor",
    "read_classes",
    "write_classes",
    "source_category_ids",
    "check_class_list",
    "model_spec",
    "solver_spec",
    "distributed_spec",
]


class ModelFolderError(D2RetrainError):
    """A model folder lacks classes.json, or was trained for other classes."""


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
    trust_pickle: bool = False
    freeze_at: int = 2
    coco_names: dict[str, str] = dataclasses.field(default_factory=dict)

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

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    crop: float | None = None
    scale_jitter: tuple[float, float] | None = None

    @property
    def crops(self) -> bool:
        """Whether instances can be cut, so boxes are recomputed from the cropped masks."""
        return self.crop is not None or self.scale_jitter is not None


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """Solver and augmentation, with detectron2's semantics for both engines.

    Defaults live in the config schema (see :mod:`d2retrain.core.config`).

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
        min_size_test: Shortest edge at inference.
        max_size_test: Longest-edge cap at inference.
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
    min_size_test: int
    max_size_test: int
    flip: bool
    amp: bool
    seed: int
    clip_gradients: float
    max_loss: float
    keep: str = "best"
    patience: int = 0
    augment: AugmentSpec = AugmentSpec()

    @property
    def kept(self) -> str:
        """The weights a trained model folder serves: ``best`` (the best evaluation during
        training) or ``final``; without evaluations during training there is no best."""
        return "best" if self.keep == "best" and self.eval_period > 0 else "final"


LAUNCH_KEYS = ("num_gpus", "num_machines", "machine_rank", "dist_url")


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """How many processes train one model, and where they meet (detectron2's ``launch`` keys).

    Not part of the fingerprint: a run killed on one GPU may resume on two.

    Attributes:
        num_gpus: Processes per machine, one per GPU (CPU processes with gloo when no GPU).
        num_machines: Machines taking part.
        machine_rank: This machine's rank, 0..num_machines-1.
        dist_url: ``tcp://HOST:PORT`` of machine 0, or ``auto`` (a free local port; one machine).
    """

    num_gpus: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"

    @property
    def world_size(self) -> int:
        """All processes of the training."""
        return self.num_gpus * self.num_machines

    def check(self, images_per_batch: int) -> None:
        """Refuse a launch that cannot work.

        Raises:
            D2RetrainError: The batch does not split evenly, the machine rank is out of
                range, or several machines have no rendezvous address.
        """
        if images_per_batch % self.world_size:
            raise D2RetrainError(
                f"train.images_per_batch {images_per_batch} does not split evenly over "
                f"{self.world_size} processes (num_gpus x num_machines); make it a multiple"
            )
        if not 0 <= self.machine_rank < self.num_machines:
            raise D2RetrainError(
                f"train.machine_rank {self.machine_rank} is not in 0..{self.num_machines - 1}"
            )
        if self.num_machines > 1 and self.dist_url == "auto":
            raise D2RetrainError("train.dist_url must name machine 0 (tcp://HOST:PORT) when num_machines > 1")


def lr_factor(solver: SolverSpec, iteration: int) -> float:
    """detectron2's WarmupMultiStepLR factor at ``iteration`` (linear warmup from 0.001)."""
    factor = solver.gamma ** sum(1 for step in solver.steps if step <= iteration)
    if iteration < solver.warmup_iterations:
        alpha = iteration / solver.warmup_iterations
        factor *= 0.001 * (1 - alpha) + alpha
    return factor


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """Everything one training run needs.

    Attributes:
        train_json: Filtered (and balanced) training annotations, category ids 1..N.
        train_images: Folder of the training images.
        val_json: Filtered validation annotations.
        val_images: Folder of the validation images.
        classes: Class names in model order.
        source_ids: Original dataset category id of each class.
        model: Network and weights.
        solver: Solver settings.
        output_dir: The model folder (``results/<subset>/model``).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU threads for the job (shared by its processes).
        distributed: Processes and machines.
        repeat_factors: ``balance: repeat``'s factor file (:mod:`d2retrain.data.repeat`), or None.
        keep_checkpoints: Periodic checkpoints kept on disk (the last; resuming needs one).
    """

    train_json: str
    train_images: str
    val_json: str
    val_images: str
    classes: tuple[str, ...]
    source_ids: tuple[int, ...]
    model: ModelSpec
    solver: SolverSpec
    output_dir: str
    keep_checkpoints: int
    device: str = "cpu"
    threads: int = 1
    distributed: DistributedSpec = DistributedSpec()
    repeat_factors: str | None = None

    @property
    def threads_per_process(self) -> int:
        """CPU threads of each training process: the job's threads, shared between them."""
        return max(1, self.threads // self.distributed.num_gpus)

    @property
    def checkpoint_dir(self) -> Path:
        """Checkpoints and live metrics: beside the outputs, not Snakemake outputs."""
        return Path(self.output_dir) / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard event files of the run (the scalars of ``metrics.jsonl``)."""
        return Path(self.output_dir) / "tensorboard"


@dataclasses.dataclass(frozen=True)
class ClassInfo:
    """What ``classes.json`` records about a trained model."""

    classes: list[str]
    source_ids: list[int]
    engine: str
    architecture: str
    weights: str
    fingerprint: str
    model_file: str = "model_final.pth"  # the trained weights the folder serves (train.keep)


def fingerprint(job: TrainJob) -> str:
    """Hash of everything that shapes the model: specs, classes and training data bytes.

    A checkpoint is resumed only when its fingerprint equals the job's.
    """
    content = {
        "model": dataclasses.asdict(job.model),
        "solver": dataclasses.asdict(job.solver),
        "classes": list(job.classes),
        "source_ids": list(job.source_ids),
        "train": file_digest(job.train_json),
    }
    if job.repeat_factors is not None:  # balance: repeat: the factors decide what trains
        content["repeat_factors"] = file_digest(job.repeat_factors)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]


def write_classes(path: str | os.PathLike[str], info: ClassInfo) -> None:
    """Write ``classes.json`` atomically."""
    write_text_atomic(path, json.dumps(dataclasses.asdict(info), indent=2) + "\n")


def read_classes(model_dir: str | os.PathLike[str], expected: Sequence[str] | None = None) -> ClassInfo:
    """Read a model folder's ``classes.json``, checking the classes when asked.

    Args:
        model_dir: The model folder.
        expected: Class names the caller needs, in order; None skips the check.

    Returns:
        The recorded class information.

    Raises:
        ModelFolderError: The file is missing or unreadable, or its classes differ.
    """
    path = Path(model_dir) / "classes.json"
    try:
        info = ClassInfo(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelFolderError(
            f"{path}: missing; is {model_dir} a folder written by d2retrain train?"
        ) from None
    except (ValueError, TypeError) as error:
        raise ModelFolderError(f"{path}: unreadable ({error})") from None
    if expected is not None and list(expected) != info.classes:
        raise ModelFolderError(
            f"{path}: the model was trained for classes {info.classes}, not {list(expected)}; "
            "retrain it or point to the right model folder"
        )
    return info


def source_category_ids(annotations_json: str, classes: Sequence[str]) -> tuple[int, ...]:
    """Original dataset ids of the named categories, as the filter's input file numbers them."""
    return tuple(
        category.id
        for category in resolve_categories(read_coco(annotations_json).categories, classes, annotations_json)
    )


def check_class_list(annotations_json: str, classes: Sequence[str]) -> None:
    """Refuse training when a filtered file's categories are not the class list, in order.

    Raises:
        CategoryError: The names or their order differ.
    """
    found = [category.name for category in read_coco(annotations_json).categories]
    if found != list(classes):
        raise CategoryError(
            f"{annotations_json}: its categories are {found}, not the class list {list(classes)}; "
            "rerun the filter with these categories"
        )


def model_spec(model: dict[str, Any], engine: str) -> ModelSpec:
    """A :class:`ModelSpec` from the ``model`` section (defaults filled in) and a resolved engine."""
    values = section_defaults("model") | model
    values.pop("engine")
    return ModelSpec(engine=engine, **values)


def solver_spec(train: dict[str, Any]) -> SolverSpec:
    """A :class:`SolverSpec` from the ``train`` section (defaults filled in)."""
    values = section_defaults("train") | train
    for key in ("device", "keep_checkpoints", *LAUNCH_KEYS):  # none of them changes the model
        values.pop(key)
    augment: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in values.pop("augment", {}).items()
    }
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return SolverSpec(**fields, augment=AugmentSpec(**augment))


def distributed_spec(train: dict[str, Any]) -> DistributedSpec:
    """A :class:`DistributedSpec` from the launch keys of the ``train`` section."""
    values = section_defaults("train") | train
    spec = {key: values[key] for key in LAUNCH_KEYS}
    if spec["machine_rank"] == -1:
        try:
            spec["machine_rank"] = int(os.environ["SLURM_NODEID"])
        except (KeyError, ValueError):
            raise D2RetrainError(
                "train.machine_rank is -1 (from SLURM_NODEID) but SLURM_NODEID is not set; "
                "run inside a SLURM job or give the machine's rank"
            ) from None
    return DistributedSpec(**spec)
