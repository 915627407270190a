"""The detectron2 engine: DefaultTrainer with the workflow's checkpoints, metrics and head surgery."""

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from d2retrain import distributed
from d2retrain.errors import D2RetrainError
from d2retrain.headsurgery import (
    WeightsError,
    check_pickle_source,
    load_checkpoint,
    load_tensor_file,
    subset_class_rows,
)
from d2retrain.predictor import Instances, build_then_load
from d2retrain.trainloop import (
    CheckpointStore,
    MetricsLog,
    TrainingDivergedError,
    check_losses,
    loader_workers,
)
from d2retrain.trainspec import ModelSpec, SolverSpec, TrainJob

logger = logging.getLogger(__name__)

__all__ = ["COCO_IDS", "build_config", "register_split", "initial_state", "train", "Detectron2Predictor"]

# detectron2's COCO models number the 80 categories 0..79 in the order of their COCO ids.
COCO_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
HEAD_LAYERS = {
    "roi_heads.box_predictor.cls_score": 1,
    "roi_heads.box_predictor.bbox_pred": 4,
    "roi_heads.mask_head.predictor": 1,
}


def register_split(name: str, annotations_json: str, image_dir: str, classes: Sequence[str]) -> str:
    """Register a COCO split once under ``name`` (unique per subset, split and content)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: load_coco_json(annotations_json, image_dir, name))
        MetadataCatalog.get(name).set(
            thing_classes=list(classes),
            json_file=annotations_json,
            image_root=image_dir,
            evaluator_type="coco",
        )
    return name


def build_config(spec: ModelSpec, solver: SolverSpec, num_classes: int, device: str, output_dir: str = ""):
    """A detectron2 ``CfgNode`` from the workflow's specs.

    Raises:
        D2RetrainError: The architecture is neither a config file nor a model-zoo name.
    """
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    try:
        path = (
            spec.architecture
            if Path(spec.architecture).is_file()
            else model_zoo.get_config_file(spec.architecture)
        )
        cfg.merge_from_file(path)
    except RuntimeError:
        raise D2RetrainError(
            f"model.architecture {spec.architecture!r} is neither a config file nor a detectron2 "
            "model-zoo name (e.g. COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml)"
        ) from None
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = (
        "cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu")
    )
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = spec.roi_batch_size_per_image
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = spec.rpn_post_nms_topk_train
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = spec.rpn_post_nms_topk_test
    cfg.SOLVER.MAX_ITER = solver.iterations
    cfg.SOLVER.IMS_PER_BATCH = solver.images_per_batch
    cfg.SOLVER.BASE_LR = solver.base_lr
    cfg.SOLVER.WARMUP_ITERS = solver.warmup_iterations
    cfg.SOLVER.WARMUP_FACTOR = 0.001
    cfg.SOLVER.STEPS = tuple(solver.steps)
    cfg.SOLVER.GAMMA = solver.gamma
    cfg.SOLVER.MOMENTUM = solver.momentum
    cfg.SOLVER.WEIGHT_DECAY = solver.weight_decay
    cfg.SOLVER.CHECKPOINT_PERIOD = solver.checkpoint_period
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = solver.clip_gradients > 0
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = solver.clip_gradients or 1.0
    cfg.SOLVER.AMP.ENABLED = solver.amp and cfg.MODEL.DEVICE.startswith("cuda")
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(solver.min_size_train)
    cfg.INPUT.MAX_SIZE_TRAIN = solver.max_size_train
    cfg.INPUT.MIN_SIZE_TEST = solver.min_size_test
    cfg.INPUT.MAX_SIZE_TEST = solver.max_size_test
    cfg.INPUT.RANDOM_FLIP = "horizontal" if solver.flip else "none"
    cfg.SEED = solver.seed
    cfg.TEST.EVAL_PERIOD = solver.eval_period  # run by the workflow's hook, not DefaultTrainer.test
    cfg.OUTPUT_DIR = output_dir
    return cfg


def initial_state(
    spec: ModelSpec, source_ids: Sequence[int], model: torch.nn.Module
) -> tuple[dict | None, bool]:
    """Base weights for ``model`` (detectron2 URLs and ``.pkl`` files included), with head surgery.

    Returns:
        The state dict (None for random initialisation), and whether head surgery made it
        the COCO base model restricted to the classes.

    Raises:
        WeightsError: The weights cannot be found or fetched.
    """
    if spec.weights in ("", "none"):
        return None, False
    from detectron2.checkpoint import DetectionCheckpointer

    checkpointer = DetectionCheckpointer(model)
    try:
        local = checkpointer.path_manager.get_local_path(spec.weights)
    except (OSError, ValueError) as error:
        raise WeightsError(
            f"model.weights {spec.weights}: cannot be loaded ({error}); offline, download it on a connected "
            "machine and set model.weights to the local file"
        ) from None
    if local.endswith(".pkl"):  # detectron2's model-zoo format: a pickle, trusted by source only
        check_pickle_source(spec.weights, spec.trust_pickle)
        loaded = checkpointer._load_file(local)["model"]
    else:
        loaded = load_tensor_file(local)
    state = {
        k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in loaded.items()
    }
    head = state.get("roi_heads.box_predictor.cls_score.weight")
    surgery = (
        spec.head_surgery
        and head is not None
        and head.shape[0] == len(COCO_IDS) + 1
        and set(source_ids) <= set(COCO_IDS)
    )
    if surgery:
        rows = [COCO_IDS.index(i) for i in source_ids]
        state = subset_class_rows(
            state, {"roi_heads.box_predictor.bbox_pred": 4, "roi_heads.mask_head.predictor": 1}, rows
        )
        state = subset_class_rows(state, {"roi_heads.box_predictor.cls_score": 1}, [*rows, len(COCO_IDS)])
        logger.info("head surgery: class layers start from COCO classes %s", list(source_ids))
    expected = model.state_dict()
    return {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}, surgery


def _trainer_class():
    from detectron2.engine import DefaultTrainer, hooks

    class Trainer(DefaultTrainer):
        """DefaultTrainer whose checkpoints and metrics go through the workflow's store and log."""

        store: CheckpointStore
        metrics: MetricsLog
        max_loss: float
        job: TrainJob

        def build_hooks(self):
            kept = [
                h
                for h in super().build_hooks()
                if not isinstance(h, hooks.PeriodicCheckpointer | hooks.PeriodicWriter | hooks.EvalHook)
            ]
            return [*kept, hooks.CallbackHook(after_step=_after_step)]

    def _after_step(trainer) -> None:
        if not distributed.is_main():  # detectron2 gathers the metrics on rank 0 only
            return
        storage = trainer.storage
        latest = {name: value for name, (value, _) in storage.latest().items()}
        losses = {k: float(v) for k, v in latest.items() if k.startswith("loss_")}
        check_losses(losses, trainer.iter, trainer.max_loss)
        trainer.metrics.write(
            {
                "iteration": trainer.iter,
                "total_loss": sum(losses.values()),
                **losses,
                "lr": float(latest.get("lr", 0.0)),
                "data_time": float(latest.get("data_time", 0.0)),
                "time": float(latest.get("time", 0.0)),
            }
        )
        done = trainer.iter + 1
        if done % trainer.cfg.SOLVER.CHECKPOINT_PERIOD == 0 and done < trainer.max_iter:
            trainer.store.save(_payload(trainer), done)
        if trainer.cfg.TEST.EVAL_PERIOD and done % trainer.cfg.TEST.EVAL_PERIOD == 0:
            trainer.metrics.write(_evaluate_now(trainer))

    return Trainer


def _evaluate_now(trainer) -> dict:
    """AP of the weights so far on the val split, with the workflow's evaluation (as the
    evaluate rule), through a separate inference copy of the model."""
    from d2retrain.evaluation import progress_record

    job = trainer.job
    predictor = Detectron2Predictor(
        None, job.model, job.solver, len(job.classes), device=trainer.cfg.MODEL.DEVICE
    )
    predictor.model.load_state_dict(_bare(trainer.model).state_dict())
    return progress_record(predictor, job.val_json, job.val_images, job.classes, trainer.iter)


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
    from d2retrain.detdata import load_records

    load_records(job.train_json, job.train_images)  # fail before training on missing images
    spec = job.distributed
    if spec.world_size == 1:
        _train_process(job, fingerprint)
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
                args=(job, fingerprint, distributed.log_file()),
            )
    return CheckpointStore(job.checkpoint_dir, fingerprint).latest()


def _launched_process(job: TrainJob, fingerprint: str, log_file: str | None) -> None:
    from detectron2.utils import comm

    distributed.process_main(comm.get_local_rank(), _train_process, log_file, (job, fingerprint))


def _load_start(trainer, job: TrainJob, resume: tuple[Path, int] | None) -> torch.nn.Module:
    """Load the base weights (fresh run) or the checkpoint (resume); return the bare network."""
    model = _bare(trainer.model)
    if resume is None:
        state, _ = initial_state(job.model, job.source_ids, model)
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


def _train_process(job: TrainJob, fingerprint: str) -> None:
    torch.set_num_threads(job.threads_per_process)
    train_name = register_split(
        f"d2retrain_{fingerprint}_train", job.train_json, job.train_images, job.classes
    )
    cfg = build_config(job.model, job.solver, len(job.classes), job.device, str(job.checkpoint_dir))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train_name,), ()
    cfg.DATALOADER.NUM_WORKERS = loader_workers(job.threads)
    store = CheckpointStore(job.checkpoint_dir, fingerprint)
    resume = store.resumable()
    distributed.barrier()  # every process has read the state before rank 0 may clear it
    if resume is None and distributed.is_main():
        store.start_fresh()
    trainer = _trainer_class()(cfg)
    trainer.store, trainer.max_loss, trainer.job = store, job.solver.max_loss, job
    model = _load_start(trainer, job, resume)
    distributed.barrier()
    main = distributed.is_main()
    trainer.metrics = (
        MetricsLog(store.folder / "metrics.jsonl", resume_from=trainer.start_iter) if main else None
    )
    try:
        trainer.train()
    except FloatingPointError as error:
        raise TrainingDivergedError(f"training diverged: {error}; the last good checkpoint is kept") from None
    finally:
        if main:
            trainer.metrics.close()
    distributed.check_in_step(model, next(model.parameters()).device)
    if main:
        store.save(_payload(trainer), job.solver.iterations)
        store.mark_finished(job.solver.iterations)
    distributed.barrier()


class Detectron2Predictor:
    """detectron2's model, loaded once; same interface as the torchvision predictor."""

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
        """Args: as :class:`d2retrain.tv_engine.TorchvisionPredictor`."""
        from detectron2.engine import DefaultPredictor

        cfg = build_config(spec, solver, num_classes, device)
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
        cfg.TEST.DETECTIONS_PER_IMAGE = max_detections
        self.cfg = cfg
        # MODEL.WEIGHTS is empty: DefaultPredictor loads nothing itself
        self._predictor = build_then_load(lambda: DefaultPredictor(cfg), weights, lambda built: built.model)
        self.model = self._predictor.model

    def __call__(self, image_bgr: np.ndarray) -> Instances:
        """Predict one BGR uint8 image."""
        return self.predict_batch([image_bgr])[0]

    @torch.inference_mode()
    def predict_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Instances]:
        """Predict several BGR uint8 images in one forward pass (``DefaultPredictor``'s
        preprocessing, applied to each)."""
        inputs = []
        for image in images_bgr:
            resized = self._predictor.aug.get_transform(image).apply_image(image)
            if self._predictor.input_format == "RGB":
                resized = resized[:, :, ::-1]
            tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()
            inputs.append(
                {"image": tensor.to(self.cfg.MODEL.DEVICE), "height": image.shape[0], "width": image.shape[1]}
            )
        return [_instances(output["instances"].to("cpu")) for output in self.model(inputs)]


def _instances(output) -> Instances:
    return Instances(
        boxes=output.pred_boxes.tensor.numpy(),
        scores=output.scores.numpy(),
        classes=output.pred_classes.numpy(),
        masks=output.pred_masks.numpy().astype(bool),
    )
