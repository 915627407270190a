"""The detectron2 engine's model half: its config from the specs, COCO head surgery, its predictor."""

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch

from d2retrain.core.errors import D2RetrainError
from d2retrain.model.cococlasses import coco_category_ids
from d2retrain.model.exported import ExportedGraph
from d2retrain.model.headsurgery import (
    WeightsError,
    check_pickle_source,
    load_tensor_file,
    log_surgery,
    subset_class_rows,
)
from d2retrain.model.instances import Instances
from d2retrain.model.predictor import ModelPredictor, build_then_load
from d2retrain.model.resize import padded_size, predict_in_groups
from d2retrain.model.specs import ModelSpec, SolverSpec

logger = logging.getLogger(__name__)

__all__ = [
    "COCO_IDS",
    "build_config",
    "export_graph",
    "initial_state",
    "make_predictor",
    "Detectron2Predictor",
]

# detectron2's COCO models number the 80 categories 0..79 in the order of their COCO ids.
COCO_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
_OPSET = 16  # RoiAlign's coordinate_transformation_mode (detectron2's aligned=True) came in opset 16
HEAD_LAYERS = {
    "roi_heads.box_predictor.cls_score": 1,
    "roi_heads.box_predictor.bbox_pred": 4,
    "roi_heads.mask_head.predictor": 1,
}


def build_config(
    spec: ModelSpec, num_classes: int, device: str, solver: SolverSpec | None = None, output_dir: str = ""
):
    """A detectron2 ``CfgNode`` from the workflow's specs (``solver``: training's keys, None to predict).

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
    # Fine-tuning: detectron2's own setup (frozen norms, FREEZE_AT); from scratch everything trains.
    cfg.MODEL.RESNETS.NORM = "FrozenBN" if spec.pretrained else "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = spec.freeze_at if spec.pretrained else 0
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = spec.roi_batch_size_per_image
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = spec.rpn_post_nms_topk_train
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = spec.rpn_post_nms_topk_test
    cfg.INPUT.MIN_SIZE_TEST = spec.min_size_test
    cfg.INPUT.MAX_SIZE_TEST = spec.max_size_test
    if solver is not None:
        _set_solver(cfg, solver)
    cfg.OUTPUT_DIR = output_dir
    return cfg


def _set_solver(cfg, solver: SolverSpec) -> None:
    """The solver, input and test keys of a detectron2 config from the workflow's solver spec."""
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
    cfg.INPUT.RANDOM_FLIP = "horizontal" if solver.flip else "none"
    cfg.SEED = solver.seed
    cfg.TEST.EVAL_PERIOD = solver.eval_period  # run by the workflow's hook, not DefaultTrainer.test


def initial_state(
    spec: ModelSpec, classes: Sequence[str], model: torch.nn.Module
) -> tuple[dict | None, bool]:
    """Base weights for ``model`` (detectron2 URLs and ``.pkl`` files included), with head surgery.

    Returns:
        The state dict (None for random initialisation), and whether head surgery made it
        the COCO base model restricted to the classes.

    Raises:
        WeightsError: The weights cannot be found or fetched.
    """
    if not spec.pretrained:
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
    coco_ids = coco_category_ids(classes, spec.coco_names)
    surgery = (
        spec.head_surgery
        and head is not None
        and head.shape[0] == len(COCO_IDS) + 1
        and any(coco_id is not None for coco_id in coco_ids)
    )
    expected = model.state_dict()
    if surgery:  # detectron2 numbers the 80 classes 0..79, background last
        rows = [COCO_IDS.index(i) if i is not None else None for i in coco_ids]
        layers = {"roi_heads.box_predictor.bbox_pred": 4, "roi_heads.mask_head.predictor": 1}
        state = subset_class_rows(state, layers, rows, expected)
        state = subset_class_rows(
            state, {"roi_heads.box_predictor.cls_score": 1}, [*rows, len(COCO_IDS)], expected
        )
        log_surgery(classes, coco_ids)
    return {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}, surgery


class Detectron2Predictor:
    """detectron2's model, loaded once; same interface as the torchvision predictor."""

    def __init__(
        self,
        weights: str | Path | None,
        spec: ModelSpec,
        num_classes: int,
        device: str = "auto",
        score_threshold: float = 0.05,
        max_detections: int = 100,
    ) -> None:
        """Args: as :class:`d2retrain.model.tv.TorchvisionPredictor`."""
        from detectron2.engine import DefaultPredictor

        cfg = build_config(spec, num_classes, device)
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
        cfg.TEST.DETECTIONS_PER_IMAGE = max_detections
        self.cfg = cfg
        # MODEL.WEIGHTS is empty: DefaultPredictor loads nothing itself
        self._predictor = build_then_load(lambda: DefaultPredictor(cfg), weights, lambda built: built.model)
        self.model = self._predictor.model
        self.device = cfg.MODEL.DEVICE  # auto resolved

    def __call__(self, image_bgr: np.ndarray) -> Instances:
        """Predict one BGR uint8 image."""
        return self.predict_batch([image_bgr])[0]

    def input_tensor(self, image_bgr: np.ndarray) -> torch.Tensor:
        """The model's input for a BGR uint8 image: ``DefaultPredictor``'s resize and colour order,
        as a CHW float tensor on the CPU."""
        resized = self._predictor.aug.get_transform(image_bgr).apply_image(image_bgr)
        if self._predictor.input_format == "RGB":
            resized = resized[:, :, ::-1]
        return torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()

    def predict_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Instances]:
        """Predict several BGR uint8 images (``DefaultPredictor``'s preprocessing, applied to each),
        those of the same padded input size in one forward pass each (detectron2's ``ImageList``
        pads a batch to its largest image: mixed sizes would change each other's predictions)."""
        inputs = [
            {"image": self.input_tensor(image), "height": image.shape[0], "width": image.shape[1]}
            for image in images_bgr
        ]
        backbone = self.model.backbone
        square = getattr(backbone, "padding_constraints", {}).get("square_size", 0)
        keys = [
            (square, square) if square else padded_size(item["image"].shape[-2:], backbone.size_divisibility)
            for item in inputs
        ]
        return predict_in_groups(inputs, keys, self._forward)

    @torch.inference_mode()
    def _forward(self, inputs: list[dict]) -> list[Instances]:
        on_device = [item | {"image": item["image"].to(self.cfg.MODEL.DEVICE)} for item in inputs]
        return [_instances(output["instances"].to("cpu")) for output in self.model(on_device)]


def export_graph(
    predictor: ModelPredictor, export_format: str, path: Path, example: np.ndarray
) -> ExportedGraph:
    """Write the model through detectron2's ``TracingAdapter`` to ``path`` (ONNX at opset 16,
    whose RoiAlign has detectron2's half-pixel ``aligned`` boxes; TorchScript by tracing). The graph
    takes the image resized as the predictor resizes it and returns the boxes in that image, the
    classes, scores and each box's mask probabilities: resize, box scaling and mask paste run in
    :mod:`d2retrain.model.exported`, as the contract says.

    Args:
        predictor: The loaded model (its score threshold and detection cap go into the graph).
        export_format: ``onnx`` or ``torchscript``.
        path: The file to write.
        example: A BGR uint8 image to trace with.

    Returns:
        What the graph expects and returns.
    """
    loaded = cast(Detectron2Predictor, predictor)
    cfg = loaded.cfg
    adapter = _tracing_adapter(loaded.model.eval(), loaded.input_tensor(example))
    outputs = {  # the adapter flattens the Instances' fields in sorted order, then the image size
        "boxes": "(K, 4) float32 x0 y0 x1 y1 in the resized image's pixels",
        "labels": "(K,) int64 class index 0..N-1: classes[label]",
        "masks": "(K, 1, M, M) float32 mask probabilities inside each box (pasted, >= 0.5: inside)",
        "scores": "(K,) float32, descending",
        "image_size": "(2,) int64 height and width of the resized image",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings on shape arithmetic detectron2 expects
        if export_format == "torchscript":
            torch.jit.trace(adapter, adapter.flattened_inputs).save(str(path))
        else:
            axes = {"image": [1, 2], "boxes": [0], "labels": [0], "masks": [0], "scores": [0]}
            torch.onnx.export(
                adapter, adapter.flattened_inputs, str(path), dynamo=False, opset_version=_OPSET,
                input_names=["image"], output_names=list(outputs), dynamic_axes=axes,
            )  # fmt: skip
    colour, edge, cap = cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    return ExportedGraph(
        input={"name": "image", "layout": "CHW", "dtype": "float32", "colour": colour, "range": [0, 255]},
        resize={"where": "outside", "shortest_edge": edge, "max_size": cap},
        outputs=outputs,
        first_label=0,
        masks="detectron2_paste",
        opset=_OPSET,
    )


def _tracing_adapter(model: torch.nn.Module, image: torch.Tensor):
    """detectron2's ``TracingAdapter`` around the model, from the resized image tensor to the
    Instances before their postprocess (boxes in the resized image, masks in their box)."""
    from detectron2.export import TracingAdapter

    def inference(module, inputs):
        return [{"instances": module.inference(inputs, do_postprocess=False)[0]}]

    # built in training mode: the exporters restore the mode they found, and the model inside follows
    return TracingAdapter(model, [{"image": image}], inference).eval()


def _instances(output) -> Instances:
    return Instances(
        boxes=output.pred_boxes.tensor.numpy(),
        scores=output.scores.numpy(),
        classes=output.pred_classes.numpy(),
        masks=output.pred_masks.numpy().astype(bool),
    )


make_predictor = Detectron2Predictor  # the engine contract's predictor factory
