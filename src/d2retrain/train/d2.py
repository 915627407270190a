"""The detectron2 engine's training half: DefaultTrainer with the workflow's checkpoints and metrics."""

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

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
    CheckpointStore,
    MetricsLog,
    TrainingDivergedError,
    check_losses,
    loader_workers,
    log_early_stop,
)
from d2retrain.train.progress import Progress
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


def _trainer_class(solver: SolverSpec, repeat: dict[int, float] | None):
    from detectron2.data import DatasetMapper, build_detection_train_loader, get_detection_dataset_dicts
    from detectron2.data.samplers import RepeatFactorTrainingSampler
    from detectron2.engine import DefaultTrainer, hooks

    class Trainer(DefaultTrainer):
        """DefaultTrainer whose checkpoints and metrics go through the workflow's store and log."""

        store: CheckpointStore
        metrics: MetricsLog
        max_loss: float
        job: TrainJob
        stopped_at: int | None = None  # iterations done when train.patience stopped training

        def build_hooks(self):
            kept = [
                h
                for h in super().build_hooks()
                if not isinstance(h, hooks.PeriodicCheckpointer | hooks.PeriodicWriter | hooks.EvalHook)
            ]
            return [*kept, hooks.CallbackHook(after_step=_after_step)]

        @classmethod
        def build_train_loader(cls, cfg):
            augmentations, recompute_boxes = detectron2_augmentations(solver)
            mapper = DatasetMapper(
                cfg, is_train=True, augmentations=augmentations, recompute_boxes=recompute_boxes
            )
            if repeat is None:
                return build_detection_train_loader(cfg, mapper=mapper)
            # balance: repeat: detectron2's sampler over the workflow's factors (the same numbers
            # as the torchvision engine), in the order of the dataset the loader reads
            dataset = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
            )
            factors = torch.tensor([repeat.get(d["image_id"], 1.0) for d in dataset], dtype=torch.float32)
            sampler = RepeatFactorTrainingSampler(factors, seed=solver.seed)
            return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset, sampler=sampler)

        def train(self):
            # _StopEarly is a BaseException: detectron2's loop logs no traceback, runs after_train
            with contextlib.suppress(_StopEarly):
                super().train()

    def _after_step(trainer) -> None:
        main = distributed.is_main()  # detectron2 gathers the metrics on rank 0 only
        done = trainer.iter + 1
        if main:
            _log_step(trainer)
        # evaluation before the checkpoint of the same iteration (see the torchvision engine)
        if trainer.cfg.TEST.EVAL_PERIOD and done % trainer.cfg.TEST.EVAL_PERIOD == 0:
            stop = False
            if main:
                record = _evaluate_now(trainer)
                trainer.metrics.write(record)
                weights = _bare(trainer.model).state_dict()
                stop = trainer.store.record_evaluation(record, weights, trainer.job.solver.patience)
            if distributed.agree(stop, torch.device(trainer.cfg.MODEL.DEVICE)):
                if main:
                    log_early_stop(trainer.store, done)
                trainer.stopped_at = done
                raise _StopEarly
        if main and done % trainer.cfg.SOLVER.CHECKPOINT_PERIOD == 0 and done < trainer.max_iter:
            trainer.store.save(_payload(trainer), done)

    return Trainer


class _StopEarly(BaseException):
    """Ends detectron2's training loop after an evaluation when ``train.patience`` says so."""


def _log_step(trainer) -> None:
    latest = {name: value for name, (value, _) in trainer.storage.latest().items()}
    losses = {k: float(v) for k, v in latest.items() if k.startswith("loss_")}
    check_losses(losses, trainer.iter + 1, trainer.max_loss)
    trainer.metrics.write(
        {
            "iteration": trainer.iter + 1,  # iterations done, as everywhere
            "total_loss": sum(losses.values()),
            **losses,
            "lr": float(latest.get("lr", 0.0)),
            "data_time": float(latest.get("data_time", 0.0)),
            "time": float(latest.get("time", 0.0)),
        }
    )


def _evaluate_now(trainer) -> dict:
    """AP of the weights so far on the val split, with the workflow's evaluation (as the
    evaluate rule), through a separate inference copy of the model."""
    job = trainer.job
    predictor = Detectron2Predictor(None, job.model, len(job.classes), device=trainer.cfg.MODEL.DEVICE)
    predictor.model.load_state_dict(_bare(trainer.model).state_dict())
    return progress_record(predictor, job.val_json, job.val_images, job.classes, trainer.iter + 1)


def _payload(trainer) -> dict:
    state = trainer.state_dict()
    state["iteration"] = trainer.iter + 1
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
    trainer = _trainer_class(job.solver, repeat)(cfg)
    trainer.store, trainer.max_loss, trainer.job = store, job.solver.max_loss, job
    model = _load_start(trainer, job, resume)
    distributed.barrier()
    main = distributed.is_main()
    trainer.metrics = (
        MetricsLog(job.folder.live_metrics, trainer.start_iter, job.tensorboard_dir, Progress.of(job.solver))
        if main
        else None
    )
    try:
        trainer.train()
    except FloatingPointError as error:
        raise TrainingDivergedError(f"training diverged: {error}; the last good checkpoint is kept") from None
    finally:
        if main:
            trainer.metrics.close()
    distributed.check_in_step(model, next(model.parameters()).device)
    done = trainer.stopped_at or job.solver.iterations
    if main:
        store.save(_payload(trainer), done)
        store.mark_finished(done)
    distributed.barrier()
