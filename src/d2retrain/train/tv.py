"""The torchvision engine's training half: the workflow's own loop over torchvision's Mask R-CNN."""

import dataclasses
import logging
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from d2retrain.data.records import load_records
from d2retrain.data.repeat import read_repeat_factors
from d2retrain.model.evaluation import progress_record
from d2retrain.model.headsurgery import load_checkpoint
from d2retrain.model.specs import SolverSpec
from d2retrain.model.tv import TorchvisionPredictor, build_model, initial_state, resolve_device
from d2retrain.train import distributed
from d2retrain.train.augment import TorchvisionAugment, torchvision_train_sizes
from d2retrain.train.job import TrainJob, lr_factor
from d2retrain.train.loop import CheckpointStore, MetricsLog, check_losses, loader_workers, log_early_stop
from d2retrain.train.samples import TrainSamples

logger = logging.getLogger(__name__)

__all__ = ["train"]


def _optimizer(model: nn.Module, solver: SolverSpec) -> torch.optim.Optimizer:
    # detectron2's defaults: WEIGHT_DECAY_NORM = 0, biases decay like weights.
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
        for parameter in module.parameters(recurse=False):
            if parameter.requires_grad:
                (no_decay if norm else decay).append(parameter)
    groups: list[dict[str, Any]] = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
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
    device = resolve_device(name)
    if device.type == "cuda" and distributed.world_size() > 1:
        return torch.device(f"cuda:{distributed.local_rank()}")
    return device


def _prepare(job: TrainJob, store: CheckpointStore) -> tuple[_Run, int]:
    torch.manual_seed(job.solver.seed)
    model = build_model(job.model, len(job.classes), torchvision_train_sizes(job.solver))
    device = _device(job.device)
    amp = job.solver.amp and device.type == "cuda"
    resume = store.resumable()
    distributed.barrier()  # every process has read the state before rank 0 may clear it
    start = 0
    if resume is None:
        if distributed.is_main():
            store.start_fresh()
        state, _ = initial_state(job.model, job.classes, model)
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
        fingerprint: The job's fingerprint (see :func:`d2retrain.train.job.fingerprint`).

    Returns:
        The final checkpoint.

    Raises:
        D2RetrainError: Missing images, bad weights, or a diverged loss.
    """
    distributed.launch(_train_process, job.distributed, job, fingerprint)
    return CheckpointStore(job.checkpoint_dir, fingerprint).latest()


def _train_process(job: TrainJob, fingerprint: str) -> None:
    torch.set_num_threads(job.threads_per_process)
    records = load_records(job.train_json, job.train_images)
    repeat = read_repeat_factors(job.repeat_factors) if job.repeat_factors else None
    augment = TorchvisionAugment(job.solver)
    group = job.solver.images_per_batch  # batches of one orientation, as detectron2's loader makes
    samples = TrainSamples(records, job.solver.seed, job.solver.flip, augment, repeat, group)
    store = CheckpointStore(job.checkpoint_dir, fingerprint, job.keep_checkpoints)
    run, start = _prepare(job, store)
    main = distributed.is_main()
    metrics = MetricsLog.of(job, start) if main else None
    iteration = start
    clock = time.perf_counter()
    quiet = None if main else True  # None: a bar on a terminal only
    bar = tqdm(total=job.solver.iterations, initial=start, desc="train", unit="it", disable=quiet)
    try:
        for images, targets in _loader(samples, job.solver, start, loader_workers(job.threads)):
            data_time = time.perf_counter() - clock
            losses = distributed.mean_over_ranks(_step(run, images, targets), run.device)
            check_losses(losses, iteration + 1, job.solver.max_loss)
            if metrics is not None:  # rank 0 alone logs, saves and evaluates
                _log_step(metrics, run, losses, iteration + 1, data_time, clock)
            run.scheduler.step()
            iteration += 1
            bar.update(1)
            # evaluation before the checkpoint of the same iteration, so that the checkpoint
            # records its best weights (a resume never skips an evaluation it does not know of)
            if job.solver.eval_period and iteration % job.solver.eval_period == 0:
                stop = False
                if metrics is not None:
                    record = _evaluate_now(job, run, iteration)
                    metrics.write(record)
                    stop = store.record_evaluation(record, run.model.state_dict(), job.solver.patience)
                if distributed.agree(stop, run.device):  # every rank stops at the same iteration
                    if main:
                        log_early_stop(store, iteration)
                    break
            checkpoint = iteration % job.solver.checkpoint_period == 0 and iteration < job.solver.iterations
            if metrics is not None and checkpoint:
                store.save(_payload(run), iteration)
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
    predictor = TorchvisionPredictor(None, job.model, len(job.classes), device=str(run.device))
    predictor.model.load_state_dict(run.model.state_dict())
    return progress_record(predictor, job.val_json, job.val_images, job.classes, iteration)


def _payload(run: _Run) -> dict:
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
    }
