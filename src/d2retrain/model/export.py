"""Export a trained model folder to ONNX or TorchScript, and verify the export on a val split.

Each engine writes its graph (``export_graph`` of :mod:`d2retrain.model.tv` and
:mod:`d2retrain.model.d2`), which ends at each box's mask probabilities; what the graph leaves out
(detectron2's resize, the mask paste) runs in :mod:`d2retrain.model.exported`, as the contract says.
"""

import contextlib
import dataclasses
import io
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from tqdm import tqdm

from d2retrain import __version__
from d2retrain.core.errors import D2RetrainError
from d2retrain.core.fileio import file_digest, write_text_atomic, write_through_temporary
from d2retrain.data.images import read_image
from d2retrain.data.records import load_records
from d2retrain.data.rescale import other_sizes, write_rescaled_split
from d2retrain.model.cococlasses import coco_category_ids
from d2retrain.model.engines import load_predictor, model_engine, read_model_config
from d2retrain.model.evaluation import coco_ap, to_coco_results
from d2retrain.model.exported import (
    CONTRACT,
    FORMATS,
    Contract,
    ExportedGraph,
    exported_predictor,
    write_contract,
)
from d2retrain.model.folder import ClassInfo, ModelFolder
from d2retrain.model.instances import Instances, Predictor
from d2retrain.model.specs import ModelSpec

logger = logging.getLogger(__name__)

__all__ = ["ExportError", "AP_TOLERANCE", "MIN_SAME_SHARE", "VERIFY_SCORE", "export_model", "verify_export"]

AP_TOLERANCE = 0.005  # exported segm and bbox AP within this of the PyTorch model's
MIN_SAME_SHARE = 0.95  # share of val images with the same detections at VERIFY_SCORE
VERIFY_SCORE = 0.5
_EXPORT_SCORE, _EXPORT_DETECTIONS = 0.05, 100  # what the evaluation keeps: AP is comparable


class ExportError(D2RetrainError):
    """An export failed, or its verification did."""


def export_model(
    model_dir: str | Path,
    export_format: str,
    output_dir: str | os.PathLike[str],
    val_json: str | None = None,
    val_images: str | None = None,
    reference_metrics: str | None = None,
    threads: int = 1,
) -> dict | None:
    """Export a model folder and, given a val split, verify the export before it is usable.

    The folder gets ``model.<format>``, then ``verify.json`` (when verified), then
    ``contract.json``, written only when the verification passed: a folder without it is refused.

    Args:
        model_dir: A folder written by training (``classes.json``, ``config.yaml``, the weights).
        export_format: ``onnx`` or ``torchscript``.
        output_dir: The export folder.
        val_json: Filtered val annotations, to verify on (None: exported unverified).
        val_images: Their images.
        reference_metrics: The model's ``eval/metrics.json``: its AP is the reference (None: the
            PyTorch model is evaluated here).
        threads: CPU threads.

    Returns:
        The verification record, or None when not verified.

    Raises:
        ExportError: Unknown format, an export failure, or a failed verification.
    """
    if export_format not in FORMATS:
        raise ExportError(f"export format {export_format!r} is unknown; use one of {', '.join(FORMATS)}")
    torch.set_num_threads(max(1, threads))
    info = ModelFolder(model_dir).read_classes()
    spec = read_model_config(model_dir)
    predictor, _ = load_predictor(
        model_dir, device="cpu", score_threshold=_EXPORT_SCORE, max_detections=_EXPORT_DETECTIONS
    )
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for stale in (CONTRACT, "verify.json"):  # an earlier export's: the folder is not usable until verified
        (output / stale).unlink(missing_ok=True)
    example = _example_image(val_json, val_images, spec)
    path = output / f"model.{export_format}"
    graph = write_through_temporary(
        path,
        lambda temporary: model_engine(info.engine).export_graph(
            predictor, export_format, temporary, example
        ),
    )
    contract = dataclasses.replace(
        _contract(export_format, path, info, spec, graph), source=_source(model_dir, info)
    )
    logger.info("exported %s to %s (%.1f MB)", model_dir, path, contract.bytes / 1e6)
    record = None
    if val_json is None or val_images is None:
        logger.warning(
            "exported without verification: give the val split (--val-json, --val-images) to check AP"
        )
    else:
        exported = exported_predictor(output, contract, "cpu", _EXPORT_SCORE, _EXPORT_DETECTIONS, threads)
        sizes = other_sizes(spec.min_size_test, spec.max_size_test)
        record = verify_export(
            predictor, exported, val_json, val_images, info.classes, reference_metrics, sizes
        )
        write_text_atomic(output / "verify.json", json.dumps(record, indent=2) + "\n")
        if not record["passed"]:
            raise ExportError(f"{output}: the export differs from the model: {'; '.join(record['failures'])}")
        summary = {key: record[key] for key in ("images", "same_share", "ap_difference", "reference")}
        contract = dataclasses.replace(contract, verified=summary | {"ap": record["ap"]["exported"]})
    write_contract(output, contract)
    return record


def _example_image(val_json: str | None, val_images: str | None, spec: ModelSpec) -> np.ndarray:
    """A real val image to trace with, or a noise image of the test size."""
    if val_json is not None and val_images is not None:
        records = load_records(val_json, val_images, require_annotations=False)
        if records:
            return read_image(records[0].path)
    side = spec.min_size_test
    return np.random.default_rng(0).integers(0, 256, (side, side * 4 // 3, 3), np.uint8)


def _source(model_dir: str | os.PathLike[str], info: ClassInfo) -> dict[str, Any]:
    weights = ModelFolder(model_dir).served_weights()
    return {
        "model_dir": str(model_dir),
        "weights": info.model_file,
        "weights_sha256": file_digest(weights),
        "fingerprint": info.fingerprint,
    }


def _contract(
    export_format: str, path: Path, info: ClassInfo, spec: ModelSpec, graph: ExportedGraph
) -> Contract:
    """The contract of a model file, from what the engine's graph expects and returns."""
    versions: dict[str, Any] = {"d2retrain": __version__, "torch": torch.__version__}
    if export_format == "onnx":
        versions["opset"] = graph.opset
    return Contract(
        format=export_format,
        file=path.name,
        sha256=file_digest(path),
        bytes=path.stat().st_size,
        engine=info.engine,
        classes=list(info.classes),
        source_ids=list(info.source_ids),
        coco_ids=list(coco_category_ids(info.classes, spec.coco_names)),
        score_threshold=_EXPORT_SCORE,
        max_detections=_EXPORT_DETECTIONS,
        source={},
        versions=versions,
        input=graph.input,
        resize=graph.resize,
        outputs=graph.outputs,
        first_label=graph.first_label,
        masks=graph.masks,
    )


def verify_export(
    reference: Predictor,
    exported: Predictor,
    val_json: str,
    val_images: str,
    classes: Sequence[str],
    reference_metrics: str | None = None,
    sizes: Sequence[tuple[int, int]] = (),
) -> dict:
    """Compare an exported model with its PyTorch model on a val split, and on a copy of it at
    other sizes.

    Passes when the exported segm and bbox AP are within :data:`AP_TOLERANCE` of the reference
    (``reference_metrics``' retrained AP, else the PyTorch model's here) and at least
    :data:`MIN_SAME_SHARE` of the images get the same detections at score >= :data:`VERIFY_SCORE`
    (count and class names); and, on the val images resized to ``sizes`` with their annotations
    rescaled alike (:func:`d2retrain.data.rescale.write_rescaled_split`), the same holds against
    the PyTorch model on those copies (the val split's images may all need no resize at all).

    Args:
        reference: The PyTorch model.
        exported: The exported model.
        val_json: Filtered val annotations (category ids 1..N in model order).
        val_images: Their images.
        classes: Class names in model order.
        reference_metrics: The model's ``eval/metrics.json`` (None: the reference AP is computed here).
        sizes: (width, height) pairs for the copies (none: the val split only).

    Returns:
        The record written to ``verify.json`` (``passed``, ``failures`` and the numbers; the copies'
        under ``other_sizes``).
    """
    images, ap, differing = _compare(reference, exported, val_json, val_images, classes)
    if reference_metrics is not None:
        retrained = json.loads(Path(reference_metrics).read_text())["retrained"]
        ap["reference"] = {kind: retrained[kind]["AP"] for kind in ("bbox", "segm")}
    else:
        ap["reference"] = dict(ap["pytorch"])
    verdict = _verdict(ap, images, differing)
    verdict["reference"] = str(reference_metrics or "the PyTorch model, evaluated here")
    if sizes:
        with tempfile.TemporaryDirectory(prefix="d2retrain-verify-") as folder:
            copies = write_rescaled_split(val_json, val_images, folder, sizes)
            found = _compare(reference, exported, *copies, classes)
        other = _verdict(found[1] | {"reference": found[1]["pytorch"]}, found[0], found[2])
        verdict["other_sizes"] = {"sizes": [list(size) for size in sizes]} | other
        verdict["failures"] += [f"at other sizes: {failure}" for failure in other["failures"]]
        verdict["passed"] = not verdict["failures"]
    logger.info(
        "verified on %d images: segm AP %.4f (reference %.4f), bbox AP %.4f (reference %.4f), "
        "same detections on %.1f%%%s",
        images,
        ap["exported"]["segm"],
        ap["reference"]["segm"],
        ap["exported"]["bbox"],
        ap["reference"]["bbox"],
        100 * verdict["same_share"],
        "; at other sizes: same detections on {:.1%}".format(verdict["other_sizes"]["same_share"])
        if sizes
        else "",
    )
    return verdict


def _compare(
    reference: Predictor, exported: Predictor, val_json: str, val_images: str, classes: Sequence[str]
) -> tuple[int, dict[str, dict[str, float]], list[str]]:
    """Both models on a split, image by image: the image count, each model's AP, and the images
    whose detections at :data:`VERIFY_SCORE` differ."""
    records = load_records(val_json, val_images, require_annotations=False)
    results: dict[str, list[dict]] = {"pytorch": [], "exported": []}
    differing = []
    category_ids = range(1, len(classes) + 1)
    for record in tqdm(records, desc="verify", unit="img", disable=None):
        image = read_image(record.path)
        ours, theirs = reference(image), exported(image)
        results["pytorch"] += to_coco_results(record.image_id, ours, category_ids)
        results["exported"] += to_coco_results(record.image_id, theirs, category_ids)
        if _names(ours, classes) != _names(theirs, classes):
            differing.append(Path(record.path).name)
    return len(records), _ap(val_json, results, classes), differing


def _verdict(ap: dict[str, dict[str, float]], images: int, differing: list[str]) -> dict:
    """The verification record: passed, why not, and the numbers."""
    difference = {kind: abs(ap["exported"][kind] - ap["reference"][kind]) for kind in ("bbox", "segm")}
    share = (images - len(differing)) / images if images else 0.0
    failures = [
        f"{kind} AP {ap['exported'][kind]:.4f} vs {ap['reference'][kind]:.4f}, more than {AP_TOLERANCE} apart"
        for kind, value in difference.items()
        if value > AP_TOLERANCE
    ]
    if not images:
        failures.append("the val split has no image: nothing to verify on")
    elif share < MIN_SAME_SHARE:
        failures.append(
            f"the same detections at score >= {VERIFY_SCORE} on {share:.1%} of the images, "
            f"under {MIN_SAME_SHARE:.0%} (e.g. {', '.join(differing[:3])})"
        )
    return {
        "passed": not failures,
        "failures": failures,
        "images": images,
        "same_detections": images - len(differing),
        "same_share": share,
        "differing_images": differing[:20],
        "ap": ap,
        "ap_difference": difference,
        "tolerance": AP_TOLERANCE,
        "min_same_share": MIN_SAME_SHARE,
        "score": VERIFY_SCORE,
    }


def _names(instances: Instances, classes: Sequence[str]) -> list[str]:
    """Class names of the instances at score >= VERIFY_SCORE, sorted (their count and names)."""
    return sorted(classes[int(label)] for label in instances.classes[instances.scores >= VERIFY_SCORE])


def _ap(val_json: str, results: dict[str, list[dict]], classes: Sequence[str]) -> dict[str, dict[str, float]]:
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(val_json)
    return {
        model: {kind: coco_ap(ground_truth, found, kind, classes)[0]["AP"] for kind in ("bbox", "segm")}
        for model, found in results.items()
    }
