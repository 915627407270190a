"""Export to ONNX and TorchScript: verified against the PyTorch model, run without torch, refused broken."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import COCO_MINI, REPO, mixed_photos, train_demo_model
from pycocotools import mask as mask_utils

from d2retrain.cli import main
from d2retrain.core.fileio import file_digest
from d2retrain.data.images import read_image
from d2retrain.data.layout import DemoLayout
from d2retrain.model.engines import load_predictor
from d2retrain.model.export import ExportError, export_model, verify_export
from d2retrain.model.exported import CONTRACT, load_exported, read_contract
from d2retrain.model.folder import ModelFolderError
from d2retrain.model.instances import Instances

pytestmark = pytest.mark.slow  # every test here reads a model trained for it: the main job's
CLASSES = ["person", "sports ball"]


@pytest.fixture(scope="module")
def trained(main_run, tmp_path_factory):
    """The main job's model (it finds the demo's objects at score 0.5), its val split and both exports,
    verified by the workflow's export rule: a folder holding ``model``, ``onnx`` and ``torchscript``
    (links into the finished run, which the tests only read)."""
    subset = main_run / "results" / "person_ball"
    root = tmp_path_factory.mktemp("export")
    (root / "model").symlink_to(subset / "model")
    for fmt in ("onnx", "torchscript"):
        (root / fmt).symlink_to(subset / "export" / fmt)
    layout = DemoLayout(main_run / "resources" / "demo")
    val = (str(subset / "data" / "val.json"), str(layout.images("val")))
    records = {fmt: json.loads((root / fmt / "verify.json").read_text()) for fmt in ("onnx", "torchscript")}
    return root, layout, val, records


@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_an_export_is_verified_on_the_val_split_and_its_contract_describes_it(trained, export_format):
    root, _, _, records = trained
    folder = root / export_format
    verify = json.loads((folder / "verify.json").read_text())
    assert verify["passed"] and verify["failures"] == [] and records[export_format]["passed"]
    assert verify["images"] == len(json.loads(Path(trained[2][0]).read_text())["images"]) >= 6
    assert verify["same_share"] >= 0.95
    for kind in ("bbox", "segm"):
        assert abs(verify["ap"]["exported"][kind] - verify["ap"]["pytorch"][kind]) <= 0.005
        assert verify["ap"]["pytorch"][kind] > 0.05  # a model that finds the demo's objects, not an empty one
    contract = read_contract(folder, CLASSES)
    model_file = folder / f"model.{export_format}"
    assert contract.file == model_file.name and contract.sha256 == file_digest(model_file)
    assert (contract.classes, contract.source_ids, contract.coco_ids) == (CLASSES, [1, 37], [1, 37])
    assert contract.input["colour"] == "RGB"
    assert (contract.resize["where"], contract.resize["rule"]) == ("outside", "torchvision")
    other = verify["other_sizes"]  # the val images at sizes that need a resize, and past the cap
    assert other["passed"] and other["images"] == verify["images"] and other["same_share"] >= 0.95
    assert any(width > contract.resize["max_size"] for width, _ in other["sizes"])
    for kind in ("bbox", "segm"):
        assert abs(other["ap"]["exported"][kind] - other["ap"]["pytorch"][kind]) <= 0.005
    assert (contract.masks, contract.first_label, list(contract.outputs)) == (
        "torchvision_paste",
        1,
        ["boxes", "labels", "scores", "masks"],
    )
    assert contract.source["weights_sha256"] == file_digest(root / "model" / contract.source["weights"])


@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_an_export_predicts_as_the_model_on_real_photos_of_other_sizes(trained, export_format, tmp_path):
    """The graph was traced on one 256x192 demo image; COCO photos, portrait and landscape, go through it."""
    root = trained[0]
    model, _ = load_predictor(root / "model", device="cpu", score_threshold=0.05, max_detections=20)
    exported, _ = load_exported(root / export_format, CLASSES, "cpu", 0.05, 20)
    photos = sorted((COCO_MINI / "val2017").glob("*.jpg"))[:12] + mixed_photos(tmp_path)
    assert {read_image(photo).shape[0] > read_image(photo).shape[1] for photo in photos} == {True, False}
    assert predicts_alike(model, exported, photos, box_pixels=0.01, mask_share=1e-4) > 0


def predicts_alike(model, exported, photos: list[Path], box_pixels: float, mask_share: float) -> int:
    """Assert that the exported model finds on each photo what the model finds: as many instances,
    boxes within ``box_pixels``, the same scores and classes, masks differing on at most
    ``mask_share`` of their pixels. Returns the instances found."""
    found = 0
    for photo in photos:
        image = read_image(photo)
        ours, theirs = model(image), exported(image)
        assert len(ours) == len(theirs), photo
        found += len(ours)
        np.testing.assert_allclose(theirs.boxes, ours.boxes, atol=box_pixels)
        np.testing.assert_allclose(theirs.scores, ours.scores, atol=1e-4)
        assert np.array_equal(theirs.classes, ours.classes)
        assert theirs.masks.shape == ours.masks.shape == (len(ours), *image.shape[:2])
        assert np.count_nonzero(theirs.masks != ours.masks) <= mask_share * ours.masks.size
    return found


def test_onnx_inference_never_imports_torch_and_writes_what_the_model_writes(trained, tmp_path):
    root, layout, _, _ = trained
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "from d2retrain.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    arguments = [
        "-i",
        str(layout.images("val")),
        "-v",
        str(layout.video),
        "--score-threshold",
        "0.3",
        "--track",
        "--tracker",
        "low_score_threshold=0.1",  # detections scored 0.1-0.3 join tracks: the same without torch
        "--max-frames",
        "30",  # half the demo video, inferred twice here: the main job infers all of it
    ]
    onnx = [
        "--model",
        str(root / "onnx"),
        "-o",
        str(tmp_path / "onnx"),
        "--coco-out",
        str(tmp_path / "onnx.json"),
    ]
    run = subprocess.run(
        [sys.executable, "-c", script, "infer", *onnx, *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert run.returncode == 0, run.stderr
    assert "torchvision exported to onnx" in run.stderr
    assert main(["infer", "--model", str(root / "model"), "-o", str(tmp_path / "pytorch"), *arguments]) == 0
    names = sorted(path.name for path in (tmp_path / "pytorch").rglob("*") if path.is_file())
    assert sorted(path.name for path in (tmp_path / "onnx").rglob("*") if path.is_file()) == names
    instances = 0
    for image in layout.images("val").glob("*.jpg"):
        ours = json.loads((tmp_path / "pytorch" / "images" / f"{image.stem}.json").read_text())["instances"]
        theirs = json.loads((tmp_path / "onnx" / "images" / f"{image.stem}.json").read_text())["instances"]
        _same_instances(ours, theirs)
        instances += len(ours)
    assert instances > 0
    frames = [
        (tmp_path / kind / "videos" / "demo.jsonl").read_text().splitlines() for kind in ("pytorch", "onnx")
    ]
    with av.open(str(layout.video)) as container:
        source_frames = min(30, container.streams.video[0].frames)  # 60 in the main job
    assert len(frames[0]) == len(frames[1]) == source_frames > 0
    for ours, theirs in zip(*frames, strict=True):
        _same_instances(json.loads(ours)["instances"], json.loads(theirs)["instances"])
    # --track without torch: the same tracks (frame, id) as the PyTorch model's
    tracks = [
        [
            row.split(",")[:2]
            for row in (tmp_path / kind / "videos" / "demo.tracks.csv").read_text().splitlines()
        ]
        for kind in ("pytorch", "onnx")
    ]
    assert tracks[0] and tracks[0] == tracks[1]
    assert all("track_id" in i for line in frames[1] for i in json.loads(line)["instances"])
    with av.open(str(tmp_path / "onnx" / "videos" / "demo.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert sum(1 for _ in container.decode(stream)) == source_frames
    assert json.loads((tmp_path / "onnx.json").read_text())["categories"][1]["name"] == "sports ball"


def _same_instances(ours: list[dict], theirs: list[dict]) -> None:
    assert [i["category_name"] for i in theirs] == [i["category_name"] for i in ours]
    for mine, other in zip(ours, theirs, strict=True):
        assert np.allclose(mine["bbox"], other["bbox"], atol=0.02)
        assert abs(mine["score"] - other["score"]) < 1e-4
        masks = [mask_utils.decode(instance["segmentation"]).astype(bool) for instance in (mine, other)]
        assert np.count_nonzero(masks[0] != masks[1]) <= 1e-4 * masks[0].size


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "truncated or replaced"),
        ("flip", "SHA-256 is not the exported file's"),
        ("no_contract", "neither a model folder (no classes.json, see d2retrain train) nor an export"),
        ("other_classes", "exported for classes ['person', 'sports ball'], not ['person', 'car']"),
        ("not_onnx", "onnxruntime cannot load it"),
        ("bad_contract", "contract.json: unreadable"),
        ("old_masks", "masks 'image' is not one this version follows"),
        ("failed", "its export failed verification (see"),
    ],
)
def test_a_broken_or_mismatched_export_is_refused_with_a_clear_message(
    trained, tmp_path, capsys, damage, message
):
    root, layout, _, _ = trained
    folder = tmp_path / "onnx"
    shutil.copytree(root / "onnx", folder)
    model_file, contract_file = folder / "model.onnx", folder / CONTRACT
    classes = ["person", "car"] if damage == "other_classes" else CLASSES
    if damage == "truncate":
        model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(model_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model_file.write_bytes(bytes(data))
    elif damage == "no_contract":
        contract_file.unlink()
        (folder / "classes.json").unlink(missing_ok=True)
    elif damage == "not_onnx":  # a file that is not ONNX at all, with a contract made to match it
        model_file.write_bytes(b"not a model\n" * 100)
        contract = json.loads(contract_file.read_text())
        contract |= {"bytes": model_file.stat().st_size, "sha256": file_digest(model_file)}
        contract_file.write_text(json.dumps(contract))
    elif damage == "bad_contract":
        contract_file.write_text(contract_file.read_text()[:100])
    elif damage == "old_masks":  # an export whose graph pasted the masks itself
        contract_file.write_text(json.dumps(json.loads(contract_file.read_text()) | {"masks": "image"}))
    elif damage == "failed":  # what a failed verification leaves
        contract_file.unlink()
        (folder / "verify.json").write_text(json.dumps({"passed": False}))
    arguments = [
        "infer",
        "--model",
        str(folder),
        "-i",
        str(layout.images("val")),
        "-o",
        str(tmp_path / "out"),
    ]
    assert main([*arguments, "--classes", *classes]) == 2
    error = capsys.readouterr().err
    assert message in error and error.startswith("d2retrain infer: error: ")
    assert not (tmp_path / "out" / "images").exists()  # refused before any image


def test_a_failed_verification_fails_the_export_and_leaves_no_usable_folder(trained, tmp_path):
    """Even where an earlier export had passed: its contract goes before the new file is written."""
    root, _, val, _ = trained
    metrics = json.loads((root / "onnx" / "verify.json").read_text())["ap"]["pytorch"]
    reference = tmp_path / "metrics.json"  # an evaluation 0.01 AP above what the model reaches
    reference.write_text(
        json.dumps({"retrained": {kind: {"AP": metrics[kind] + 0.01} for kind in ("bbox", "segm")}})
    )
    shutil.copytree(root / "onnx", tmp_path / "onnx")  # a verified export there before
    with pytest.raises(ExportError, match=r"segm AP .* more than 0.005 apart"):
        export_model(root / "model", "onnx", tmp_path / "onnx", *val, reference_metrics=str(reference))
    assert json.loads((tmp_path / "onnx" / "verify.json").read_text())["passed"] is False
    assert not (tmp_path / "onnx" / CONTRACT).exists()
    with pytest.raises(ModelFolderError, match=r"contract\.json: missing"):
        load_exported(tmp_path / "onnx")


def test_verification_counts_images_whose_detections_differ(trained):
    """An 'export' that loses the best instance of each image keeps the AP close on some splits,
    never the detections: the share check catches it."""
    root, _, val, _ = trained
    model, _ = load_predictor(root / "model", device="cpu")

    def lossy(image: np.ndarray) -> Instances:
        found = model(image)
        keep = np.argsort(-found.scores)[1:]
        return Instances(found.boxes[keep], found.scores[keep], found.classes[keep], found.masks[keep])

    record = verify_export(model, lossy, *val, CLASSES)
    assert not record["passed"] and record["same_share"] < 0.95
    assert any("same detections at score >= 0.5" in failure for failure in record["failures"])
    assert verify_export(model, model, *val, CLASSES)["passed"]


def test_the_export_command_exports_unverified_without_a_val_split_and_says_so(trained, tmp_path, capsys):
    root = trained[0]
    assert (
        main(["export", "--model", str(root / "model"), "--format", "onnx", "-o", str(tmp_path / "x")]) == 0
    )
    assert "exported without verification" in capsys.readouterr().err
    assert read_contract(tmp_path / "x").classes == CLASSES and not (tmp_path / "x" / "verify.json").exists()
    assert (
        main(
            [
                "export",
                "--model",
                str(root / "model"),
                "--format",
                "onnx",
                "-o",
                str(tmp_path / "y"),
                "--val-json",
                trained[2][0],
            ]
        )
        == 2
    )


@pytest.fixture(scope="module")
def detectron2_model(tmp_path_factory):
    """A detectron2 R50-FPN model folder trained a few iterations on the demo (small sizes)."""
    root = tmp_path_factory.mktemp("d2export")
    train = {
        "iterations": 12,
        "images_per_batch": 2,
        "eval_period": 0,
        "min_size_train": [192],
        "max_size_train": 256,
    }
    model = {
        "engine": "detectron2",
        "architecture": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
        "rpn_post_nms_topk_train": 100,
        "roi_batch_size_per_image": 32,
        "min_size_test": 192,
        "max_size_test": 256,
    }
    folder, layout, files = train_demo_model(
        root, {"train": 8, "val": 6, "video_frames": 2}, train, CLASSES, model
    )
    return folder, layout, files


@pytest.mark.detectron2
@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_a_detectron2_model_exports_through_its_tracing_adapter_and_predicts_as_detectron2(
    detectron2_model, tmp_path, export_format
):
    """The graph ends before the mask paste; the package resizes, scales the boxes back and pastes
    the masks as detectron2's predictor does."""
    folder, layout, files = detectron2_model
    record = export_model(folder, export_format, tmp_path, files["val"], str(layout.images("val")))
    assert record is not None and record["passed"], record
    contract = read_contract(tmp_path, CLASSES)
    assert (contract.engine, contract.masks, contract.first_label) == ("detectron2", "detectron2_paste", 0)
    assert contract.resize == {"where": "outside", "shortest_edge": 192, "max_size": 256}
    model, _ = load_predictor(folder, device="cpu", score_threshold=0.05, max_detections=20)
    exported, _ = load_exported(tmp_path, CLASSES, "cpu", 0.05, 20)
    photos = [
        *sorted(layout.images("val").glob("*.jpg"))[:2],
        *sorted((COCO_MINI / "val2017").glob("*.jpg"))[:2],
    ]
    assert predicts_alike(model, exported, photos, box_pixels=0.05, mask_share=1e-3) > 0
