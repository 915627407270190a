"""One training run: what it trains on, with which specs, in how many processes; its fingerprint."""

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from d2retrain.core.errors import D2RetrainError
from d2retrain.core.fileio import file_digest
from d2retrain.core.mlflowlog import MlflowSettings
from d2retrain.model.folder import ModelFolder
from d2retrain.model.specs import LAUNCH_KEYS, ModelSpec, SolverSpec

logger = logging.getLogger(__name__)

__all__ = ["DistributedSpec", "TrainJob", "distributed_spec", "fingerprint", "lr_factor"]


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

    num_gpus: int
    num_machines: int
    machine_rank: int
    dist_url: str

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
        mlflow: Where the run is tracked in MLflow, or None (not part of the fingerprint).
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
    device: str
    threads: int
    distributed: DistributedSpec
    repeat_factors: str | None = None
    mlflow: MlflowSettings | None = None

    @property
    def threads_per_process(self) -> int:
        """CPU threads of each training process: the job's threads, shared between them."""
        return max(1, self.threads // self.distributed.num_gpus)

    @property
    def folder(self) -> ModelFolder:
        """The model folder the job writes."""
        return ModelFolder(self.output_dir)

    @property
    def checkpoint_dir(self) -> Path:
        """Checkpoints and live metrics: beside the outputs, not Snakemake outputs."""
        return self.folder.checkpoints

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard event files of the run (the scalars of ``metrics.jsonl``)."""
        return self.folder.tensorboard


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


def distributed_spec(train: dict[str, Any]) -> DistributedSpec:
    """A :class:`DistributedSpec` from the launch keys of the ``train`` section."""
    spec = {key: train[key] for key in LAUNCH_KEYS}
    if spec["machine_rank"] == -1:
        try:
            spec["machine_rank"] = int(os.environ["SLURM_NODEID"])
        except (KeyError, ValueError):
            raise D2RetrainError(
                "train.machine_rank is -1 (from SLURM_NODEID) but SLURM_NODEID is not set; "
                "run inside a SLURM job or give the machine's rank"
            ) from None
    return DistributedSpec(**spec)
