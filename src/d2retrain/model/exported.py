"""Exported models: the contract beside the file, and predictors that run it (ONNX without PyTorch).

An export folder holds ``model.onnx`` or ``model.torchscript`` and ``contract.json``, which says what
the file expects and returns (classes, colour order, resize rule, thresholds, outputs) and the
file's size and SHA-256: a truncated, replaced or other-class export is refused at load, before
any image is read. :mod:`d2retrain.model.export` writes them.
"""

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from d2retrain.core.config import allowed_values
from d2retrain.core.fileio import file_digest, write_text_atomic
from d2retrain.model.folder import ModelFolder, ModelFolderError
from d2retrain.model.instances import Instances, Predictor
from d2retrain.model.paste import PASTE_METHODS, paste_masks
from d2retrain.model.resize import RESIZE_RULES, resized_size

logger = logging.getLogger(__name__)

__all__ = [
    "CONTRACT",
    "FORMATS",
    "Contract",
    "ExportedGraph",
    "is_export",
    "read_contract",
    "write_contract",
    "model_classes",
    "load_exported",
    "exported_predictor",
    "graph_input",
]

CONTRACT = "contract.json"
FORMATS = allowed_values("export.formats")  # the model file is model.<format>


@dataclasses.dataclass(frozen=True)
class Contract:
    """What an exported model expects and returns (``contract.json``).

    Attributes:
        format: ``onnx`` or ``torchscript``.
        file: The model file's name, beside the contract.
        sha256: The model file's SHA-256, checked at load.
        bytes: Its size.
        engine: The engine that trained it.
        classes: Class names in model order (label ``first_label + index``).
        source_ids: Each class's category id in the training data.
        coco_ids: Each class's row in COCO's 91 (None: not a COCO category).
        input: The image tensor: name, layout, dtype, colour order and value range.
        resize: ``{"where": "inside"|"outside", "rule", "shortest_edge", "max_size"}``: inside the
            graph (torchvision exports written before the resize moved out), or to be done before
            it, to the size the engine's predictor uses (``rule``, see
            :func:`d2retrain.model.resize.resized_size`; outputs then scaled back).
        score_threshold: Lowest score the graph keeps (a predictor may only raise it).
        max_detections: Most instances the graph returns per image (a predictor may only lower it).
        outputs: Output tensor name -> meaning, in the graph's order.
        first_label: The label of the first class (1 for torchvision, whose 0 is the background).
        masks: How the per-box mask probabilities are pasted into the image (by
            :func:`d2retrain.model.paste.paste_masks`, outside the graph): ``torchvision_paste``
            or ``detectron2_paste``.
        source: The model folder it was exported from: weights file, its SHA-256, fingerprint.
        versions: Of the exporter's packages and the ONNX opset.
        verified: The verification's summary (images, APs, share of same detections), or None
            when exported without a val split.
    """

    format: str
    file: str
    sha256: str
    bytes: int
    engine: str
    classes: list[str]
    source_ids: list[int]
    coco_ids: list[int | None]
    input: dict[str, Any]
    resize: dict[str, Any]
    score_threshold: float
    max_detections: int
    outputs: dict[str, str]
    first_label: int
    masks: str
    source: dict[str, Any]
    versions: dict[str, Any]
    verified: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class ExportedGraph:
    """What an engine's exported graph expects and returns: its part of the :class:`Contract`
    (fields of the same names), and the ONNX opset it was exported at."""

    input: dict[str, Any]
    resize: dict[str, Any]
    outputs: dict[str, str]
    first_label: int
    masks: str
    opset: int


def is_export(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is an export folder (has ``contract.json``) rather than a model folder.

    Raises:
        ModelFolderError: It is neither (no ``contract.json`` and no ``classes.json``).
    """
    if (Path(folder) / CONTRACT).is_file():
        return True
    verify = Path(folder) / "verify.json"
    if verify.is_file() and not _passed(verify):
        raise ModelFolderError(
            f"{folder}: its export failed verification (see {verify}) and has no {CONTRACT}: "
            "it is not usable; retrain, or export again"
        )
    if not ModelFolder(folder).classes_file.is_file():
        raise ModelFolderError(
            f"{folder}: neither a model folder (no classes.json, see d2retrain train) nor an export "
            f"folder (no {CONTRACT}, see d2retrain export)"
        )
    return False


def _passed(verify: Path) -> bool:
    try:
        return bool(json.loads(verify.read_text()).get("passed"))
    except (OSError, ValueError, AttributeError):
        return False


def write_contract(folder: str | os.PathLike[str], contract: Contract) -> None:
    """Write ``contract.json`` atomically (last: its presence makes the folder an export).

    Args:
        folder: The export folder.
        contract: What its model file expects and returns.
    """
    write_text_atomic(Path(folder) / CONTRACT, json.dumps(dataclasses.asdict(contract), indent=2) + "\n")


def read_contract(folder: str | os.PathLike[str], expected_classes: Sequence[str] | None = None) -> Contract:
    """Read and check an export folder's contract against its model file.

    Args:
        folder: The export folder.
        expected_classes: Refuse an export of other classes (None: no check).

    Returns:
        The contract.

    Raises:
        ModelFolderError: No or unreadable contract, a missing, truncated or replaced model file,
            an unknown format, or other classes.
    """
    path = Path(folder) / CONTRACT
    try:
        record = json.loads(path.read_text())
        contract = Contract(**record)
    except FileNotFoundError:
        raise ModelFolderError(
            f"{path}: missing; is {folder} a folder written by d2retrain export?"
        ) from None
    except (ValueError, TypeError) as error:
        raise ModelFolderError(f"{path}: unreadable ({error}); export the model again") from None
    _check_known(path, contract)
    model = Path(folder) / contract.file
    if not model.is_file():
        raise ModelFolderError(f"{model}: missing; {path} names it; export the model again")
    size = model.stat().st_size
    if size != contract.bytes:
        raise ModelFolderError(
            f"{model}: {size} bytes, the contract says {contract.bytes}: truncated or replaced; "
            "export the model again"
        )
    if file_digest(model) != contract.sha256:
        raise ModelFolderError(
            f"{model}: its SHA-256 is not the exported file's ({contract.sha256[:12]}...): "
            "corrupted or replaced; export the model again"
        )
    if expected_classes is not None and list(expected_classes) != contract.classes:
        raise ModelFolderError(
            f"{path}: the model was exported for classes {contract.classes}, not {list(expected_classes)}; "
            "export the right model folder"
        )
    return contract


def _check_known(path: Path, contract: Contract) -> None:
    """Refuse a contract this version cannot follow (an older or newer export)."""
    known = {
        "format": (contract.format, FORMATS),
        "masks": (contract.masks, PASTE_METHODS),
        "resize": (contract.resize.get("where"), ("inside", "outside")),
        "resize rule": (contract.resize.get("rule", "detectron2"), RESIZE_RULES),
        "input colour": (contract.input.get("colour"), ("RGB", "BGR")),
        "input range": (contract.input.get("range"), ([0, 1], [0, 255])),
    }
    for what, (value, allowed) in known.items():
        if value not in allowed:
            raise ModelFolderError(
                f"{path}: {what} {value!r} is not one this version follows ({', '.join(map(str, allowed))}); "
                "export the model again with this version"
            )


def model_classes(folder: str | os.PathLike[str]) -> tuple[list[str], list[int]]:
    """Class names and source ids of a model folder or of an export folder.

    Args:
        folder: A model folder (``classes.json``) or an export folder (``contract.json``).

    Returns:
        The class names in model order and each one's category id in the training data.

    Raises:
        ModelFolderError: Neither, or a broken contract (:func:`read_contract`).
    """
    if is_export(folder):
        contract = read_contract(folder)
        return contract.classes, contract.source_ids
    info = ModelFolder(folder).read_classes()
    return info.classes, info.source_ids


def load_exported(
    folder: str | os.PathLike[str],
    expected_classes: Sequence[str] | None = None,
    device: str = "auto",
    score_threshold: float = 0.05,
    max_detections: int = 100,
    threads: int = 1,
) -> tuple[Predictor, Contract]:
    """Load an export folder for prediction (ONNX through onnxruntime, without PyTorch).

    Args:
        folder: An export folder (``contract.json`` and the model file).
        expected_classes: Refuse an export of other classes.
        device: ``auto``, ``cpu`` or ``cuda``.
        score_threshold: Lowest score kept (at least the contract's).
        max_detections: Most instances per image (at most the contract's).
        threads: CPU threads of the runtime.

    Returns:
        The predictor and the contract.

    Raises:
        ModelFolderError: See :func:`read_contract`; or the runtime cannot load the file.
    """
    contract = read_contract(folder, expected_classes)
    if contract.verified is None:
        logger.warning("%s was exported without verification on a val split: its AP is not checked", folder)
    return exported_predictor(folder, contract, device, score_threshold, max_detections, threads), contract


def exported_predictor(
    folder: str | os.PathLike[str],
    contract: Contract,
    device: str = "auto",
    score_threshold: float = 0.05,
    max_detections: int = 100,
    threads: int = 1,
) -> Predictor:
    """A predictor of the model file a contract describes (already checked, or being verified).

    Args:
        folder: The export folder.
        contract: Its contract.
        device: ``auto``, ``cpu`` or ``cuda`` (onnxruntime: its CUDA provider when installed).
        score_threshold: Lowest score kept (at least the contract's).
        max_detections: Most instances per image (at most the contract's).
        threads: CPU threads of the runtime.

    Returns:
        The predictor: the graph with the contract's pre- and post-processing around it.

    Raises:
        ModelFolderError: The runtime cannot load the file.
    """
    if score_threshold < contract.score_threshold:
        logger.warning(
            "the export keeps scores >= %g only; a threshold of %g finds no more",
            contract.score_threshold,
            score_threshold,
        )
    if max_detections > contract.max_detections:
        logger.warning("the export returns at most %d instances per image", contract.max_detections)
    path = Path(folder) / contract.file
    if contract.format == "onnx":
        runner: Any = _OnnxRunner(path, device, threads)
    else:
        runner = _TorchScriptRunner(path, device, threads, list(contract.outputs))
    return _ExportedPredictor(runner, contract, score_threshold, max_detections)


class _OnnxRunner:
    """The ONNX graph in an onnxruntime session: one CHW image in, the output arrays out."""

    def __init__(self, path: Path, device: str, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        available = onnxruntime.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            logger.warning(
                "onnxruntime has no CUDA provider here (install onnxruntime-gpu); running on the CPU"
            )
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf classes
            raise ModelFolderError(f"{path}: onnxruntime cannot load it ({error}); export it again") from None
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.input = self.session.get_inputs()[0].name
        self.outputs = [output.name for output in self.session.get_outputs()]

    def __call__(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, {self.input: tensor}), strict=True))


class _TorchScriptRunner:
    """The TorchScript module (``torch.jit.load``): the image tensor in, the contract's outputs out,
    in order."""

    def __init__(self, path: Path, device: str, threads: int, names: Sequence[str]) -> None:
        import torch
        import torchvision  # noqa: F401  registers the torchvision::nms and roi_align operators it calls

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        torch.set_num_threads(max(1, threads))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
                self.module = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as error:  # RuntimeError from the archive reader, among others
            raise ModelFolderError(
                f"{path}: torch.jit.load cannot load it ({error}); export it again"
            ) from None
        self.names = list(names)

    def __call__(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        image = torch.from_numpy(tensor).to(self.device)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "RCNN always returns a (Losses, Detections) tuple"
            if self.names[0] == "detections":  # torchvision: (losses, [{"boxes", ...}])
                return {key: value.cpu().numpy() for key, value in self.module([image])[1][0].items()}
            return {
                name: value.cpu().numpy() for name, value in zip(self.names, self.module(image), strict=True)
            }


class _ExportedPredictor:
    """Pre- and post-processing around an exported graph, as the contract says."""

    def __init__(self, runner: Any, contract: Contract, score_threshold: float, max_detections: int) -> None:
        self.runner, self.contract = runner, contract
        self.device = str(runner.device)
        self.score_threshold, self.max_detections = score_threshold, max_detections

    def __call__(self, image_bgr: np.ndarray) -> Instances:
        """Predict one BGR uint8 image."""
        height, width = image_bgr.shape[:2]
        image, scale = graph_input(image_bgr, self.contract.input, self.contract.resize)
        found = self.runner(image)
        scores = found["scores"]
        boxes = np.clip(found["boxes"].astype(np.float32) / scale, 0, [width, height, width, height])
        keep = np.flatnonzero((scores >= self.score_threshold) & _nonempty(boxes))
        keep = keep[np.argsort(-scores[keep], kind="stable")][: self.max_detections]
        boxes = boxes[keep].astype(np.float32)
        pasted = paste_masks(found["masks"][keep][:, 0], boxes, height, width, self.contract.masks)
        # as each engine's predictor thresholds: detectron2 >= 0.5, torchvision (this package) > 0.5
        inside = pasted >= 0.5 if self.contract.masks == "detectron2_paste" else pasted > 0.5
        return Instances(
            boxes=boxes.reshape(-1, 4),
            scores=scores[keep].astype(np.float32),
            classes=found["labels"][keep].astype(np.int64) - self.contract.first_label,
            masks=inside.reshape(-1, height, width),
        )

    def predict_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Instances]:
        """Predict images one by one (the exported graphs take one image)."""
        return [self(image) for image in images_bgr]


def _nonempty(boxes: np.ndarray) -> np.ndarray:
    """Boxes with a positive width and height (detectron2 drops the others once clipped)."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def graph_input(
    image_bgr: np.ndarray, graph_input: dict[str, Any], resize: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """An exported graph's input tensor for an image, as its contract's ``input`` and ``resize``
    say, and the factors (x, y, x, y) its boxes are to be divided by.

    The image is resized to the size its PyTorch predictor uses (:func:`resized_size`): by PIL's
    bilinear filter on the uint8 image for detectron2 (as its ``ResizeShortestEdge``), by a bilinear
    interpolation of the float image without antialiasing for torchvision (as
    ``torch.nn.functional.interpolate`` in its transform; pixels within 1e-6).

    Args:
        image_bgr: A BGR uint8 image.
        graph_input: The contract's ``input`` (colour order, value range).
        resize: The contract's ``resize`` (``where``, ``rule``, ``shortest_edge``, ``max_size``).

    Returns:
        The CHW float32 tensor and the box factors.
    """
    height, width = image_bgr.shape[:2]
    size, scale = (height, width), np.ones(4, np.float32)
    rule = resize.get("rule", "detectron2")  # contracts before the rule was named: detectron2's
    if resize["where"] == "outside":
        size = resized_size(height, width, resize["shortest_edge"], resize["max_size"], rule)
        scale = np.array([size[1] / width, size[0] / height] * 2, np.float32)
        if rule == "detectron2":
            image_bgr = np.asarray(Image.fromarray(image_bgr).resize(size[::-1], Image.Resampling.BILINEAR))
    image = image_bgr[:, :, ::-1] if graph_input["colour"] == "RGB" else image_bgr
    tensor = np.ascontiguousarray(image, dtype=np.float32)
    if graph_input["range"] == [0, 1]:
        tensor /= 255
    if tensor.shape[:2] != size:  # torchvision's rule: the float image, bilinear, no antialiasing
        tensor = np.asarray(cv2.resize(tensor, size[::-1], interpolation=cv2.INTER_LINEAR), np.float32)
    return np.ascontiguousarray(tensor.transpose(2, 0, 1)), scale
