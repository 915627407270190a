"""The detectron2 engine's training half: detectron2's ``DefaultTrainer`` and its own hooks, with the
workflow's evaluation, checkpoints and metrics. Imported only when detectron2 is (see
:mod:`d2retrain.train.engines`)."""

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from detectron2.engine import DefaultTrainer, HookBase, hooks

from d2retrain.core.errors import D2RetrainError
from d2retrain.data.records import load_records
from d2retrain.data.repeat import read_repeat_factors
from d2retrain.model.d2 import Detectron2Predictor, build_config, initial_state
from d2retrain.model.evaluation import progress_record
from d2retrain.model.headsurgery import load_checkpoint
from d2retrain.model.specs import SolverSpec
from d2retrain.train import distributed
from d2retrain.train.augment import detectron2_augmentations
from d2retrain.train.job import TrainJob
from d2retrain.train.loop import (
    BEST_METRIC,
    CheckpointStore,
    MetricsLog,
    TrainingDivergedError,
    check_losses,
    loader_workers,
    log_early_stop,
)
from d2retrain.train.samples import training_images

logger = logging.getLogger(__name__)

__all__ = ["register_split", "train"]


def register_split(
    name: str,
    annotations_json: str,
    image_dir: str,
    classes: Sequence[str],
    image_ids: frozenset[int] | None = None,
) -> str:
    """Register a COCO split once under ``name`` (unique per subset, split and content), with
    only the images ``image_ids`` when given."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    def load() -> list[dict]:
        dicts = load_coco_json(annotations_json, image_dir, name)
        return dicts if image_ids is None else [d for d in dicts if d["image_id"] in image_ids]

    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            thing_classes=list(classes),
            json_file=annotations_json,
            image_root=image_dir,
            evaluator_type="coco",
        )
    return name


class _StopEarly(BaseException):
    """Ends detectron2's training loop after an evaluation when ``train.patience`` says so.

    detectron2's loop has no stop: a hook can only raise. A BaseException, so that detectron2 logs
    no traceback for it; :meth:`WorkflowTrainer.train` catches it, and ``after_train`` hooks run."""


class WorkflowTrainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with detectron2's own hooks for the workflow's job:
    ``EvalHook`` (the workflow's evaluation, :func:`_evaluation`), ``BestCheckpointer`` and
    ``PeriodicCheckpointer`` writing through the workflow's :class:`CheckpointStore`
    (:class:`_StoreCheckpointer`), early stop by ``train.patience`` (:class:`_Patience`), and the
    loss lines of ``metrics.jsonl``. Augmentations and ``balance: repeat`` sampling in its loader.
    """

    def __init__(self, cfg, job: TrainJob, store: CheckpointStore, repeat: dict[int, float] | None) -> None:
        """Args:
        cfg: From :func:`d2retrain.model.d2.build_config` with the split registered.
        job: The training job.
        store: Its checkpoints (rank 0 writes them).
        repeat: ``balance: repeat``'s factors by image id, or None.
        """
        self.job, self.store, self.repeat = job, store, repeat
        self.metrics: MetricsLog | None = None  # rank 0's, set before train()
        self.stopped_at: int | None = None  # iterations done when train.patience stopped training
        super().__init__(cfg)

    def build_hooks(self):
        """detectron2's timer and scheduler, then the workflow's: losses, evaluation, best weights,
        patience, periodic checkpoints (in that order: a checkpoint records the best of its iteration)."""
        kept = [
            hook
            for hook in super().build_hooks()
            if not isinstance(hook, hooks.PeriodicCheckpointer | hooks.PeriodicWriter | hooks.EvalHook)
        ]
        solver, main = self.job.solver, distributed.is_main()
        period = solver.eval_period
        ours = [
            hooks.CallbackHook(after_step=_log_step),
            # the last evaluation at the last iteration only when it is one of the period's, as the
            # torchvision engine does
            _EvalWhenFinished(period, lambda: _evaluation(self), eval_after_train=_evaluates_last(solver)),
        ]
        if main:
            ours.append(
                _ResumedBest(period, _StoreCheckpointer(self), BEST_METRIC, at_end=_evaluates_last(solver))
            )
        ours.append(_Patience(period, solver.patience))
        if main:
            ours.append(hooks.PeriodicCheckpointer(_StoreCheckpointer(self), solver.checkpoint_period))
        return [*kept, *ours]

    def build_train_loader(self, cfg):
        """detectron2's loader with the workflow's augmentations; ``balance: repeat``: detectron2's
        repeat-factor sampler over the workflow's factors (the torchvision engine's numbers)."""
        from detectron2.data import DatasetMapper, build_detection_train_loader, get_detection_dataset_dicts
        from detectron2.data.samplers import RepeatFactorTrainingSampler

        augmentations, recompute_boxes = detectron2_augmentations(self.job.solver)
        mapper = DatasetMapper(
            cfg, is_train=True, augmentations=augmentations, recompute_boxes=recompute_boxes
        )
        if self.repeat is None:
            return build_detection_train_loader(cfg, mapper=mapper)
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        factors = torch.tensor([self.repeat.get(d["image_id"], 1.0) for d in dataset], dtype=torch.float32)
        sampler = RepeatFactorTrainingSampler(factors, seed=self.job.solver.seed)
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset, sampler=sampler)

    def train(self):
        """Train to ``train.iterations``, or until :class:`_Patience` stops it."""
        with contextlib.suppress(_StopEarly):
            super().train()


def _done(trainer: WorkflowTrainer, iteration: int) -> int:
    """Iterations done when a hook sees detectron2's ``iteration``: the 0-based index of the
    iteration in ``after_step``, one past the last (or more, after an empty resumed loop) in
    ``after_train``."""
    return min(iteration + 1, trainer.max_iter)


def _evaluates_last(solver: SolverSpec) -> bool:
    return solver.eval_period > 0 and solver.iterations % solver.eval_period == 0


class _StoreCheckpointer:
    """What detectron2's checkpoint hooks call (``save(name, iteration=...)``, 0-based iterations),
    written through the workflow's :class:`CheckpointStore` (iterations done, durable and atomic
    files, ``state.json`` with the fingerprint and the best record): ``model_best`` keeps the best
    weights, any other name a resumable checkpoint (once per iteration)."""

    def __init__(self, trainer: WorkflowTrainer) -> None:
        self.trainer = trainer
        self.path_manager = None  # PeriodicCheckpointer keeps no files itself (max_to_keep None)

    def save(self, name: str, iteration: int, **_: object) -> None:
        trainer, store, done = self.trainer, self.trainer.store, _done(self.trainer, int(iteration))
        if name == "model_best":
            value = float(trainer.storage.latest()[BEST_METRIC][0])
            store.keep_best(_bare(trainer.model).state_dict(), done, value)
        elif store.last_saved != done:  # a period's checkpoint and model_final can fall together
            store.save(_payload(trainer, done), done)


def _finished(trainer: WorkflowTrainer) -> bool:
    """Whether detectron2's loop ran to its end (its hooks' own test, ``iter + 1 >= max_iter``, also
    holds after a failure in the last iteration)."""
    return trainer.iter >= trainer.max_iter


class _EvalWhenFinished(hooks.EvalHook):
    """detectron2's ``EvalHook``, which evaluates after training only when training finished: a loss
    that diverged in the last iteration stops training without an evaluation of those weights."""

    def after_train(self) -> None:
        if not _finished(self.trainer):
            self._eval_after_train = False
        super().after_train()


class _ResumedBest(hooks.BestCheckpointer):
    """detectron2's ``BestCheckpointer``, which starts from the best of a resumed run's past (the
    store's record) instead of none, and checks after training only when the last iteration was
    evaluated (``at_end``), as ``EvalHook`` is told."""

    def __init__(self, period: int, checkpointer: _StoreCheckpointer, metric: str, at_end: bool) -> None:
        super().__init__(period, checkpointer, metric, mode="max", file_prefix="model_best")
        self.at_end = at_end

    def before_train(self) -> None:
        best = self.trainer.store.best
        if best is not None:
            self.best_metric, self.best_iter = best["value"], best["iteration"] - 1

    def after_train(self) -> None:
        if self.at_end and _finished(self.trainer):
            super().after_train()


class _Patience(HookBase):
    """Early stop: after each evaluation (the period's, as ``EvalHook``), count it against the best
    (the store's) and stop the loop when ``patience`` evaluations in a row did not improve (0: never).
    Every process takes part: they agree on stopping."""

    def __init__(self, period: int, patience: int) -> None:
        self.period, self.patience = period, patience

    def after_step(self) -> None:
        trainer = self.trainer
        done = trainer.iter + 1
        if not self.period or done % self.period or done == trainer.max_iter:
            return
        main = distributed.is_main()
        stop = main and trainer.store.count_evaluation(done, self.patience)
        if distributed.agree(stop, torch.device(trainer.cfg.MODEL.DEVICE)):
            if main:
                log_early_stop(trainer.store, done)
            trainer.stopped_at = done
            raise _StopEarly


def _log_step(trainer: WorkflowTrainer) -> None:
    """The iteration's losses, learning rate and times to ``metrics.jsonl`` (rank 0: detectron2
    gathers the metrics there); a diverged loss stops training."""
    metrics = trainer.metrics  # rank 0's alone
    if metrics is None:
        return
    latest = {name: value for name, (value, _) in trainer.storage.latest().items()}
    losses = {k: float(v) for k, v in latest.items() if k.startswith("loss_")}
    check_losses(losses, trainer.iter + 1, trainer.job.solver.max_loss)
    metrics.write(
        {
            "iteration": trainer.iter + 1,  # iterations done, as everywhere
            "total_loss": sum(losses.values()),
            **losses,
            "lr": float(latest.get("lr", 0.0)),
            "data_time": float(latest.get("data_time", 0.0)),
            "time": float(latest.get("time", 0.0)),
        }
    )


def _evaluation(trainer: WorkflowTrainer) -> dict[str, float]:
    """``EvalHook``'s function: on rank 0, the evaluation (:func:`_evaluate_now`) logged to
    ``metrics.jsonl``, and its :data:`BEST_METRIC` for detectron2's storage, where
    ``BestCheckpointer`` reads it. Other ranks evaluate nothing."""
    metrics = trainer.metrics  # rank 0's alone
    if metrics is None:
        return {}
    record = _evaluate_now(trainer, _done(trainer, trainer.iter))
    metrics.write(record)
    return {BEST_METRIC: float(record[BEST_METRIC])}


def _evaluate_now(trainer: WorkflowTrainer, done: int) -> dict:
    """AP of the weights after ``done`` iterations on the val split, with the workflow's evaluation
    (as the evaluate rule), through a separate inference copy of the model."""
    job = trainer.job
    predictor = Detectron2Predictor(None, job.model, len(job.classes), device=trainer.cfg.MODEL.DEVICE)
    predictor.model.load_state_dict(_bare(trainer.model).state_dict())
    return progress_record(predictor, job.val_json, job.val_images, job.classes, done)


def _payload(trainer: WorkflowTrainer, done: int) -> dict:
    state = trainer.state_dict()
    state["iteration"] = done
    return {"model": _bare(trainer.model).state_dict(), "trainer": state}


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside detectron2's data-parallel wrapper (itself for one process)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train(job: TrainJob, fingerprint: str) -> Path:
    """Train (or resume) with detectron2 and return the final checkpoint.

    Several processes (``job.distributed``) go through detectron2's ``launch``, one per GPU.

    Raises:
        D2RetrainError: Missing images, bad weights or config, a diverged loss, or several
            processes asked for without GPUs.
    """
    # fails before training on missing images; the images that train are those of the torchvision
    # engine (negatives included: detectron2's FILTER_EMPTY_ANNOTATIONS is off, the set is given)
    images = training_images(load_records(job.train_json, job.train_images))
    image_ids = frozenset(record.image_id for record in images)
    spec = job.distributed
    if spec.world_size == 1:
        _train_process(job, fingerprint, image_ids)
    elif not torch.cuda.is_available():
        raise D2RetrainError(
            f"train.num_gpus x num_machines is {spec.world_size}, but the detectron2 engine runs "
            "several processes on GPUs only (its data-parallel wrapper pins each to a GPU); set "
            "train.num_gpus: 1, or model.engine: torchvision, which runs CPU processes with gloo"
        )
    else:
        from detectron2.engine import launch

        with distributed.launch_errors():
            launch(
                _launched_process,
                spec.num_gpus,
                spec.num_machines,
                spec.machine_rank,
                distributed.rendezvous_url(spec),
                args=(job, fingerprint, image_ids, distributed.log_file()),
            )
    return CheckpointStore(job.checkpoint_dir, fingerprint).latest()


def _launched_process(
    job: TrainJob, fingerprint: str, image_ids: frozenset[int], log_file: str | None
) -> None:
    from detectron2.utils import comm

    distributed.process_main(comm.get_local_rank(), _train_process, log_file, (job, fingerprint, image_ids))


def _load_start(trainer, job: TrainJob, resume: tuple[Path, int] | None) -> torch.nn.Module:
    """Load the base weights (fresh run) or the checkpoint (resume); return the bare network."""
    model = _bare(trainer.model)
    if resume is None:
        state, _ = initial_state(job.model, job.classes, model)
        if state is not None:
            model.load_state_dict(state, strict=False)
    else:
        path, iteration = resume
        checkpoint = load_checkpoint(path)
        model.load_state_dict(checkpoint["model"])
        trainer.load_state_dict(checkpoint["trainer"])
        trainer.start_iter = iteration
        logger.info("resuming from %s at iteration %d", path, iteration)
    return model


def _train_process(job: TrainJob, fingerprint: str, image_ids: frozenset[int]) -> None:
    torch.set_num_threads(job.threads_per_process)
    train_name = register_split(
        f"d2retrain_{fingerprint}_train", job.train_json, job.train_images, job.classes, image_ids
    )
    cfg = build_config(job.model, len(job.classes), job.device, job.solver, str(job.checkpoint_dir))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train_name,), ()
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False  # negatives train; image_ids says which images
    cfg.DATALOADER.NUM_WORKERS = loader_workers(job.threads)
    store = CheckpointStore(job.checkpoint_dir, fingerprint, job.keep_checkpoints)
    resume = store.resumable()
    distributed.barrier()  # every process has read the state before rank 0 may clear it
    if resume is None and distributed.is_main():
        store.start_fresh()
    repeat = read_repeat_factors(job.repeat_factors) if job.repeat_factors else None
    trainer = WorkflowTrainer(cfg, job, store, repeat)
    model = _load_start(trainer, job, resume)
    distributed.barrier()
    main = distributed.is_main()
    metrics = MetricsLog.of(job, trainer.start_iter) if main else None
    trainer.metrics = metrics
    try:
        trainer.train()
    except FloatingPointError as error:
        raise TrainingDivergedError(f"training diverged: {error}; the last good checkpoint is kept") from None
    finally:
        if metrics is not None:
            metrics.close()
    distributed.check_in_step(model, next(model.parameters()).device)
    done = trainer.stopped_at or job.solver.iterations
    if main:
        if store.last_saved != done:  # stopped early (PeriodicCheckpointer saved the last iteration)
            store.save(_payload(trainer, done), done)
        store.mark_finished(done)
    distributed.barrier()
