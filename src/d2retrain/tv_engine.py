"""The torchvision engine: Mask R-CNN from torchvision, trained with detectron2's solver semantics."""

import dataclasses
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from tqdm import tqdm

from d2retrain import distributed
from d2retrain.detdata import TrainSamples, load_records
from d2retrain.errors import D2RetrainError
from d2retrain.evaluation import progress_record
from d2retrain.headsurgery import load_checkpoint, load_state_dict_source, subset_class_rows
from d2retrain.predictor import Instances, build_then_load
from d2retrain.trainloop import CheckpointStore, MetricsLog, check_losses, loader_workers
from d2retrain.trainspec import ModelSpec, SolverSpec, TrainJob, lr_factor

logger = logging.getLogger(__name__)

__all__ = ["ARCHITECTURES", "build_model", "initial_state", "train", "TorchvisionPredictor"]

ARCHITECTURES = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet18_fpn")
COCO_ROWS = 91  # torchvision's COCO models index classes by COCO category id (0 = background)

# Class-specific layers: name -> rows per class (box regression has 4 per class).
HEAD_LAYERS = {
    "roi_heads.box_predictor.cls_score": 1,
    "roi_heads.box_predictor.bbox_pred": 4,
    "roi_heads.mask_predictor.mask_fcn_logits": 1,
}


def build_model(spec: ModelSpec, num_classes: int, solver: SolverSpec) -> nn.Module:
    """Build an untrained Mask R-CNN with ``num_classes`` classes plus background.

    Args:
        spec: Architecture (one of :data:`ARCHITECTURES`).
        num_classes: Foreground classes.
        solver: Input sizes for training and inference.

    Returns:
        The model.

    Raises:
        D2RetrainError: The architecture is unknown.
    """
    sizes = {
        "min_size": solver.min_size_train,
        "max_size": solver.max_size_train,
        "box_batch_size_per_image": spec.roi_batch_size_per_image,
        "rpn_post_nms_top_n_train": spec.rpn_post_nms_topk_train,
        "rpn_pre_nms_top_n_train": 2 * spec.rpn_post_nms_topk_train,
        "rpn_post_nms_top_n_test": spec.rpn_post_nms_topk_test,
        "rpn_pre_nms_top_n_test": spec.rpn_post_nms_topk_test,
    }
    if spec.architecture == "maskrcnn_resnet18_fpn":
        return _small_maskrcnn(num_classes, sizes)
    if spec.architecture in ARCHITECTURES:
        builder = getattr(torchvision.models.detection, spec.architecture)
        return builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **sizes)
    raise D2RetrainError(
        f"model.architecture {spec.architecture!r} is not a torchvision architecture; "
        f"use one of {', '.join(ARCHITECTURES)}"
    )


def _small_maskrcnn(num_classes: int, options: dict) -> MaskRCNN:
    """The demo network: ResNet-18 + FPN at 128 channels, a 512-d box head, a 128-channel
    mask head, BatchNorm throughout: learns the demo data from scratch on a CPU in minutes."""
    channels, representation = 128, 512
    body = torchvision.models.resnet18(weights=None)
    layers = {f"layer{k}": str(k - 1) for k in range(1, 5)}
    backbone = BackboneWithFPN(body, layers, [64, 128, 256, 512], channels, extra_blocks=LastLevelMaxPool())
    return MaskRCNN(
        backbone,
        box_head=TwoMLPHead(channels * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes + 1),
        mask_head=MaskRCNNHeads(channels, (channels,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1),
        **options,
    )


def initial_state(
    spec: ModelSpec, source_ids: Sequence[int], model: nn.Module
) -> tuple[dict[str, torch.Tensor] | None, bool]:
    """The starting weights for ``model``: base weights, with head surgery when they are COCO's.

    Args:
        spec: Weights source and head-surgery switch.
        source_ids: Original COCO category id of each class, in model order.
        model: The model the weights are for (gives the expected shapes).

    Returns:
        A state dict to load (None for random initialisation), and whether head surgery
        made it the COCO base model restricted to the classes.

    Raises:
        WeightsError: The weights cannot be found or fetched.
    """
    state = load_state_dict_source(spec.weights, torchvision_names=True)
    if state is None:
        return None, False
    expected = model.state_dict()
    coco_head = state.get("roi_heads.box_predictor.cls_score.weight")
    surgery = (
        spec.head_surgery
        and coco_head is not None
        and coco_head.shape[0] == COCO_ROWS
        and max(source_ids) < COCO_ROWS
    )
    if surgery:
        rows = [0, *source_ids]
        state = subset_class_rows(state, HEAD_LAYERS, rows)
        logger.info("head surgery: class layers start from COCO rows %s", rows)
    mismatched = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    for key in mismatched:
        del state[key]
    if mismatched:
        logger.info("left at random (shape differs from the base weights): %s", ", ".join(mismatched))
    return state, surgery


def _optimizer(model: nn.Module, solver: SolverSpec) -> torch.optim.Optimizer:
    # detectron2's defaults: WEIGHT_DECAY_NORM = 0, biases decay like weights.
    decay, no_decay = [], []
    for module in model.modules():
        norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
        for parameter in module.parameters(recurse=False):
            if parameter.requires_grad:
                (no_decay if norm else decay).append(parameter)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(
        groups, lr=solver.base_lr, momentum=solver.momentum, weight_decay=solver.weight_decay
    )


def _collate(batch: list) -> tuple[list, list]:
    return [item[0] for item in batch], [item[1] for item in batch]


def _loader(
    samples: TrainSamples, solver: SolverSpec, start: int, workers: int
) -> torch.utils.data.DataLoader:
    """This process's share of each batch: iteration i takes samples i*B .. i*B+B-1 over all
    processes, so the data order does not depend on how many processes train."""
    share = solver.images_per_batch // distributed.world_size()
    first = distributed.rank() * share
    positions = [
        iteration * solver.images_per_batch + first + offset
        for iteration in range(start, solver.iterations)
        for offset in range(share)
    ]
    return torch.utils.data.DataLoader(
        samples,
        batch_size=share,
        sampler=positions,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
    )


@dataclasses.dataclass
class _Run:
    model: nn.Module  # the network (its state is what checkpoints hold)
    forward: nn.Module  # the network, wrapped for data-parallel training when several processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool
    clip: float


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.world_size() > 1:
        name = f"cuda:{distributed.local_rank()}"
    return torch.device(name)


def _prepare(job: TrainJob, store: CheckpointStore) -> tuple[_Run, int]:
    torch.manual_seed(job.solver.seed)
    model = build_model(job.model, len(job.classes), job.solver)
    device = _device(job.device)
    amp = job.solver.amp and device.type == "cuda"
    resume = store.resumable()
    distributed.barrier()  # every process has read the state before rank 0 may clear it
    start = 0
    if resume is None:
        if distributed.is_main():
            store.start_fresh()
        state, _ = initial_state(job.model, job.source_ids, model)
        if state is not None:
            model.load_state_dict(state, strict=False)
    model.to(device).train()
    optimizer = _optimizer(model, job.solver)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, job.solver))
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    if resume is not None:
        path, start = resume
        checkpoint = load_checkpoint(path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        logger.info("resuming from %s at iteration %d", path, start)
    forward = model
    if distributed.world_size() > 1:
        device_ids = [device] if device.type == "cuda" else None
        forward = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    distributed.barrier()
    run = _Run(model, forward, optimizer, scheduler, scaler, device, amp, job.solver.clip_gradients)
    return run, start


def _step(run: _Run, images: list, targets: list) -> dict[str, float]:
    images = [image.to(run.device, non_blocking=True) for image in images]
    targets = [{k: v.to(run.device, non_blocking=True) for k, v in t.items()} for t in targets]
    context = torch.autocast(run.device.type) if run.amp else nullcontext()
    with context:
        losses = run.forward(images, targets)
    total = sum(losses.values())
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    if run.clip > 0:  # detectron2's "norm" clipping: each parameter on its own
        run.scaler.unscale_(run.optimizer)
        for group in run.optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    torch.nn.utils.clip_grad_norm_(parameter, run.clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return {name: float(value.detach()) for name, value in losses.items()}


def train(job: TrainJob, fingerprint: str) -> Path:
    """Train (or resume) and return the path of the final checkpoint.

    With ``job.distributed`` asking for several processes, each trains a replica on its
    share of every batch (torch.distributed: NCCL on GPUs, gloo on the CPU); rank 0 writes
    checkpoints, metrics and evaluations.

    Args:
        job: What to train on and how.
        fingerprint: The job's fingerprint (see :func:`d2retrain.trainspec.fingerprint`).

    Returns:
        The final checkpoint.

    Raises:
        D2RetrainError: Missing images, bad weights, or a diverged loss.
    """
    distributed.launch(_train_process, job.distributed, job, fingerprint)
    return CheckpointStore(job.checkpoint_dir, fingerprint).latest()


def _train_process(job: TrainJob, fingerprint: str) -> None:
    torch.set_num_threads(job.threads_per_process)
    samples = TrainSamples(load_records(job.train_json, job.train_images), job.solver.seed, job.solver.flip)
    store = CheckpointStore(job.checkpoint_dir, fingerprint)
    run, start = _prepare(job, store)
    main = distributed.is_main()
    metrics = MetricsLog(store.folder / "metrics.jsonl", resume_from=start) if main else None
    iteration = start
    clock = time.perf_counter()
    quiet = None if main else True  # None: a bar on a terminal only
    bar = tqdm(total=job.solver.iterations, initial=start, desc="train", unit="it", disable=quiet)
    try:
        for images, targets in _loader(samples, job.solver, start, loader_workers(job.threads)):
            data_time = time.perf_counter() - clock
            losses = distributed.mean_over_ranks(_step(run, images, targets), run.device)
            check_losses(losses, iteration, job.solver.max_loss)
            if main:
                _log_step(metrics, run, losses, iteration, data_time, clock)
            run.scheduler.step()
            iteration += 1
            bar.update(1)
            if main:
                if iteration % job.solver.checkpoint_period == 0 and iteration < job.solver.iterations:
                    store.save(_payload(run), iteration)
                if job.solver.eval_period and iteration % job.solver.eval_period == 0:
                    metrics.write(_evaluate_now(job, run, iteration - 1))
            clock = time.perf_counter()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    distributed.check_in_step(run.model, run.device)
    if main:
        store.save(_payload(run), iteration)
        store.mark_finished(iteration)
        logger.info("trained %d iterations (%d this run)", iteration, iteration - start)
    distributed.barrier()


def _log_step(
    metrics: MetricsLog, run: _Run, losses: dict[str, float], iteration: int, data_time: float, clock: float
) -> None:
    metrics.write(
        {
            "iteration": iteration,
            "total_loss": sum(losses.values()),
            **losses,
            "lr": run.optimizer.param_groups[0]["lr"],
            "data_time": data_time,
            "time": time.perf_counter() - clock,
        }
    )


def _evaluate_now(job: TrainJob, run: _Run, iteration: int) -> dict:
    """AP of the weights so far on the val split, through a separate inference copy."""
    predictor = TorchvisionPredictor(None, job.model, job.solver, len(job.classes), device=str(run.device))
    predictor.model.load_state_dict(run.model.state_dict())
    return progress_record(predictor, job.val_json, job.val_images, job.classes, iteration)


def _payload(run: _Run) -> dict:
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
    }


class TorchvisionPredictor:
    """Load a trained model once and predict image after image."""

    def __init__(
        self,
        weights: str | Path,
        spec: ModelSpec,
        solver: SolverSpec,
        num_classes: int,
        device: str = "auto",
        score_threshold: float = 0.05,
        max_detections: int = 100,
    ) -> None:
        """Args:
        weights: ``model_final.pth`` (a state dict, or a checkpoint holding one under "model").
        spec: The architecture.
        solver: Test input sizes.
        num_classes: Foreground classes.
        device: ``auto``, ``cpu`` or ``cuda``.
        score_threshold: Lowest score kept.
        max_detections: Most instances per image.
        """
        solver = dataclasses.replace(
            solver, min_size_train=(solver.min_size_test,), max_size_train=solver.max_size_test
        )
        self.model = build_then_load(lambda: build_model(spec, num_classes, solver), weights)
        self.model.roi_heads.score_thresh = score_threshold
        self.model.roi_heads.detections_per_img = max_detections
        self.device = _device(device)
        self.model.to(self.device).eval()

    def __call__(self, image_bgr: np.ndarray) -> Instances:
        """Predict one BGR uint8 image."""
        return self.predict_batch([image_bgr])[0]

    @torch.inference_mode()
    def predict_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Instances]:
        """Predict several BGR uint8 images in one forward pass."""
        tensors = [
            torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1]))
            .to(self.device)
            .permute(2, 0, 1)
            .float()
            .div_(255)
            for image in images_bgr
        ]
        return [
            Instances(
                boxes=output["boxes"].cpu().numpy(),
                scores=output["scores"].cpu().numpy(),
                classes=output["labels"].cpu().numpy() - 1,
                masks=(output["masks"][:, 0] > 0.5).cpu().numpy(),
            )
            for output in self.model(tensors)
        ]
