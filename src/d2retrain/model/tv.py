"""The torchvision engine's model half: torchvision's Mask R-CNN, its COCO head surgery, its predictor."""

import copy
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from d2retrain.core.errors import D2RetrainError
from d2retrain.model.cococlasses import coco_category_ids
from d2retrain.model.exported import ExportedGraph, graph_input
from d2retrain.model.headsurgery import load_state_dict_source, log_surgery, subset_class_rows
from d2retrain.model.instances import Instances
from d2retrain.model.predictor import ModelPredictor, build_then_load
from d2retrain.model.resize import padded_size, predict_in_groups, resized_size
from d2retrain.model.specs import ModelSpec, SolverSpec

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "build_model",
    "export_graph",
    "freeze_backbone",
    "initial_state",
    "make_predictor",
    "resolve_device",
    "TorchvisionPredictor",
]

ARCHITECTURES = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet18_fpn")
_OPSET = 11  # tried: torch 2.15 + onnxruntime 1.32 reproduce the eager boxes within 0.01 px
COCO_ROWS = 91  # torchvision's COCO models index classes by COCO category id (0 = background)

# Class-specific layers: name -> rows per class (box regression has 4 per class).
HEAD_LAYERS = {
    "roi_heads.box_predictor.cls_score": 1,
    "roi_heads.box_predictor.bbox_pred": 4,
    "roi_heads.mask_predictor.mask_fcn_logits": 1,
}


def build_model(spec: ModelSpec, num_classes: int, solver: SolverSpec | None = None) -> nn.Module:
    """Build an untrained Mask R-CNN with ``num_classes`` classes plus background.

    Args:
        spec: Architecture (one of :data:`ARCHITECTURES`) and test-time input sizes.
        num_classes: Foreground classes.
        solver: Training's input sizes, for a model built to train; None: a model built to
            predict, resizing to the spec's test sizes.

    Returns:
        The model.

    Raises:
        D2RetrainError: The architecture is unknown.
    """
    min_size, max_size = (
        ((spec.min_size_test,), spec.max_size_test)
        if solver is None
        else (solver.min_size_train, solver.max_size_train)
    )
    sizes = {
        "min_size": min_size,
        "max_size": max_size,
        "box_batch_size_per_image": spec.roi_batch_size_per_image,
        "rpn_post_nms_top_n_train": spec.rpn_post_nms_topk_train,
        "rpn_pre_nms_top_n_train": 2 * spec.rpn_post_nms_topk_train,
        "rpn_post_nms_top_n_test": spec.rpn_post_nms_topk_test,
        "rpn_pre_nms_top_n_test": spec.rpn_post_nms_topk_test,
    }
    if spec.architecture == "maskrcnn_resnet18_fpn":
        model = _small_maskrcnn(num_classes, sizes)
    elif spec.architecture in ARCHITECTURES:
        builder = getattr(torchvision.models.detection, spec.architecture)
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **sizes)
    else:
        raise D2RetrainError(
            f"model.architecture {spec.architecture!r} is not a torchvision architecture; "
            f"use one of {', '.join(ARCHITECTURES)}"
        )
    if spec.pretrained:
        freeze_backbone(model.backbone.body, spec.freeze_at)
    return model


# The ResNet body's stages in detectron2's order: stem (conv1, bn1), res2 (layer1) .. res5 (layer4).
_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def freeze_backbone(body: nn.Module, freeze_at: int) -> None:
    """detectron2's fine-tuning setup on a ResNet body: every BatchNorm becomes a
    ``FrozenBatchNorm2d`` (statistics and affine fixed, as torchvision's COCO models and
    detectron2's ``FrozenBN``), and the parameters of the first ``freeze_at`` stages stop training.

    torchvision builds its models with live BatchNorm and every stage trainable unless it loads
    its own weights itself; a batch of 2-16 images would then move the COCO statistics at every step.
    """
    _freeze_norms(body)
    for names in _STAGES[:freeze_at]:
        for name in names:
            getattr(body, name).requires_grad_(False)


def _freeze_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_norms(child)


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
    spec: ModelSpec, classes: Sequence[str], model: nn.Module
) -> tuple[dict[str, torch.Tensor] | None, bool]:
    """The starting weights for ``model``: base weights, with head surgery when they are COCO's.

    Args:
        spec: Weights source, head-surgery switch and ``coco_names`` aliases.
        classes: Class names in model order; those named as COCO categories start from their rows.
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
    coco_ids = coco_category_ids(classes, spec.coco_names)
    surgery = (
        spec.head_surgery
        and coco_head is not None
        and coco_head.shape[0] == COCO_ROWS
        and any(coco_id is not None for coco_id in coco_ids)
    )
    if surgery:  # torchvision's COCO rows are indexed by category id, 0 = background
        state = subset_class_rows(state, HEAD_LAYERS, [0, *coco_ids], expected)
        log_surgery(classes, coco_ids)
    mismatched = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    for key in mismatched:
        del state[key]
    if mismatched:
        logger.info("left at random (shape differs from the base weights): %s", ", ".join(mismatched))
    return state, surgery


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; other names as they are."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class TorchvisionPredictor:
    """Load a trained model once and predict image after image."""

    def __init__(
        self,
        weights: str | Path | None,
        spec: ModelSpec,
        num_classes: int,
        device: str = "auto",
        score_threshold: float = 0.05,
        max_detections: int = 100,
    ) -> None:
        """Args:
        weights: ``model_final.pth`` (a state dict, or a checkpoint holding one under "model").
        spec: The architecture and test input sizes.
        num_classes: Foreground classes.
        device: ``auto``, ``cpu`` or ``cuda``.
        score_threshold: Lowest score kept.
        max_detections: Most instances per image.
        """
        self.model = build_then_load(lambda: build_model(spec, num_classes), weights)
        roi_heads = cast(RoIHeads, self.model.roi_heads)
        roi_heads.score_thresh = score_threshold
        roi_heads.detections_per_img = max_detections
        self.device = resolve_device(device)
        self.model.to(self.device).eval()

    def __call__(self, image_bgr: np.ndarray) -> Instances:
        """Predict one BGR uint8 image."""
        return self.predict_batch([image_bgr])[0]

    def input_size(self, image_bgr: np.ndarray) -> tuple[int, int]:
        """The padded size of an image's input: images of equal padded size can share a batch
        (each gets exactly the input it would get alone)."""
        transform = cast(GeneralizedRCNNTransform, self.model.transform)
        height, width = image_bgr.shape[:2]
        size = resized_size(height, width, transform.min_size[-1], transform.max_size, "torchvision")
        return padded_size(size, transform.size_divisible)

    def predict_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Instances]:
        """Predict several BGR uint8 images, those of the same input size in one forward pass each
        (torchvision pads a batch to its largest image: mixed sizes would change each other's
        predictions)."""
        keys = [self.input_size(image) for image in images_bgr]
        return predict_in_groups(list(images_bgr), keys, self._forward)

    @torch.inference_mode()
    def _forward(self, images_bgr: Sequence[np.ndarray]) -> list[Instances]:
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


def export_graph(
    predictor: ModelPredictor, export_format: str, path: Path, example: np.ndarray
) -> ExportedGraph:
    """Write the model, from the resized image to each box's mask probabilities (normalisation
    inside), to ``path``: ONNX by ``torch.onnx.export(dynamo=False, opset_version=11)`` (the dynamo
    exporter fails in ``torch.export`` on this model), TorchScript by ``torch.jit.script``. The
    resize (to the size the predictor uses, :func:`d2retrain.model.resize.resized_size`), the box
    scaling and the mask paste run outside the graph, for the kept instances only
    (:mod:`d2retrain.model.exported`): pasted inside, every instance above the graph's 0.05 went
    into a full-size float image, 100 x 720 x 1280 floats a frame.

    Args:
        predictor: The loaded model (its score threshold and detection cap go into the graph).
        export_format: ``onnx`` or ``torchscript``.
        path: The file to write.
        example: A BGR uint8 image to trace with (ONNX).

    Returns:
        What the graph expects and returns.
    """
    model = cast(MaskRCNN, predictor.model.eval())
    transform = cast(GeneralizedRCNNTransform, model.transform)
    edge, cap = transform.min_size[-1], transform.max_size
    graph = ExportedGraph(
        input={"name": "image", "layout": "CHW", "dtype": "float32", "colour": "RGB", "range": [0, 1]},
        resize={"where": "outside", "rule": "torchvision", "shortest_edge": edge, "max_size": cap},
        outputs={
            "boxes": "(K, 4) float32 x0 y0 x1 y1 in the resized image's pixels",
            "labels": "(K,) int64 class index 1..N (0 is the background): classes[label - 1]",
            "scores": "(K,) float32, descending",
            "masks": "(K, 1, M, M) float32 mask probabilities inside each box (pasted, > 0.5: inside)",
        },
        first_label=1,
        masks="torchvision_paste",
        opset=_OPSET,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings on shape arithmetic torchvision expects
        if export_format == "torchscript":
            torch.jit.script(_Unpasted(model)).save(str(path))
        else:
            image = torch.from_numpy(graph_input(example, graph.input, graph.resize)[0])
            torch.onnx.export(
                _Unpasted(model),
                (image,),
                str(path),
                dynamo=False,
                opset_version=_OPSET,
                input_names=["image"],
                output_names=list(graph.outputs),
                dynamic_axes={"image": [1, 2], "boxes": [0], "labels": [0], "scores": [0], "masks": [0]},
            )
    return graph


class _Unpasted(nn.Module):
    """torchvision's Mask R-CNN on one image already resized (:func:`resized_size`, rule
    ``torchvision``) up to each box's mask probabilities: its forward (``GeneralizedRCNN.forward``
    in eval mode) with the masks left unpasted and the boxes in the resized image. The resize runs
    outside the graph: traced or scripted, torchvision computes the scale in float32 and a 478x640
    photo came out at another width than in eager PyTorch."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.transform = copy.deepcopy(model.transform)
        self.transform.__class__ = _NoResize
        self.backbone, self.rpn, self.roi_heads = model.backbone, model.rpn, model.roi_heads
        self.eval()  # the exporters restore the mode they found, and the shared modules follow it

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        images, _ = self.transform([image])
        features = self.backbone(images.tensors)
        proposals, _ = self.rpn(images, features)
        detections, _ = self.roi_heads(features, proposals, images.image_sizes)
        found = detections[0]
        return found["boxes"], found["labels"], found["scores"], found["masks"]


class _NoResize(GeneralizedRCNNTransform):
    """torchvision's transform without its resize: the exported graph's input is resized outside."""

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target


make_predictor = TorchvisionPredictor  # the engine contract's predictor factory
