"""Inference on images and videos: outputs, the real video, bad files, inputs and shards, the CLI."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
import pytest
from helpers import COCO_MINI, VIDEO, filled, mixed_photos, train_demo_model
from pycocotools import mask as mask_utils

from d2retrain.cli import main
from d2retrain.core.errors import D2RetrainError
from d2retrain.infer.inputs import InputFile, discover
from d2retrain.infer.pipeline import inference_options, load_image, run_inference
from d2retrain.infer.summary import write_summary
from d2retrain.workflow.planning import shards
from d2retrain.workflow.shard import infer_shard

CLASSES = ["person", "sports ball"]
# An untrained model scores everything low: a low threshold and a cap keep instances to draw.
OPTIONS = {"score_threshold": 0.01, "max_detections": 5, "device": "cpu"}


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """A model folder trained for two iterations on a small demo dataset, and that dataset."""
    root = tmp_path_factory.mktemp("infer")
    train = {"iterations": 2, "images_per_batch": 2, "warmup_iterations": 1, "steps": []}
    model, layout, _ = train_demo_model(root, {"train": 6, "val": 4, "video_frames": 12}, train, CLASSES)
    return model, layout


def test_each_image_gets_a_drawn_png_and_coco_results_json(demo_model, tmp_path, caplog):
    model, layout = demo_model
    images = sorted(layout.images("val").glob("*.jpg"))
    with caplog.at_level(logging.INFO):
        options = inference_options(filled("inference", OPTIONS | {"device": "auto"}))
        statuses = run_inference(model, images, [], tmp_path, options, CLASSES)
    assert re.search(
        rf"torchvision model from {re.escape(str(model))} on (cpu|cuda)\b", caplog.text
    )  # not auto
    assert [s.status for s in statuses] == ["ok"] * len(images)
    for image in images:
        source = cv2.imread(str(image))
        drawn = cv2.imread(str(tmp_path / "images" / f"{image.stem}.png"))
        record = json.loads((tmp_path / "images" / f"{image.stem}.json").read_text())
        assert drawn.shape == source.shape and not np.array_equal(drawn, source)  # something drawn
        assert record["status"] == "ok" and (record["height"], record["width"]) == source.shape[:2]
        assert 1 <= len(record["instances"]) <= 5
        for instance in record["instances"]:
            assert (instance["category_id"], instance["category_name"]) in {
                (1, "person"),
                (37, "sports ball"),
            }
            assert instance["score"] >= 0.01 and len(instance["bbox"]) == 4
            assert mask_utils.decode(instance["segmentation"]).shape == source.shape[:2]


def test_a_loaded_model_skips_random_init_and_predicts_as_one_built_the_slow_way(demo_model):
    import torch

    from d2retrain.model.engines import load_predictor, read_model_config
    from d2retrain.model.tv import build_model

    model, layout = demo_model
    init_functions = {name: getattr(torch.nn.init, name) for name in ("kaiming_uniform_", "normal_", "ones_")}
    predictor, _ = load_predictor(model, device="cpu", score_threshold=0.01, max_detections=5)
    assert {name: getattr(torch.nn.init, name) for name in init_functions} == init_functions  # restored

    spec = read_model_config(model)
    slow = build_model(spec, len(CLASSES))  # randomly initialised, then loaded
    slow.load_state_dict(torch.load(model / "model_final.pth", weights_only=True)["model"])
    slow.roi_heads.score_thresh, slow.roi_heads.detections_per_img = 0.01, 5
    loaded = predictor.model.state_dict()
    assert all(torch.equal(value, loaded[key]) for key, value in slow.state_dict().items())
    image = load_image(sorted(layout.images("val").glob("*.jpg"))[0])
    with torch.inference_mode():
        expected = slow.eval()([torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255])[0]
    got = predictor(image)
    assert len(got) == len(expected["scores"]) > 0
    np.testing.assert_array_equal(got.scores, expected["scores"].numpy())
    np.testing.assert_array_equal(got.masks, (expected["masks"][:, 0] > 0.5).numpy())


@pytest.mark.detectron2
def test_a_loaded_detectron2_model_skips_random_init_and_predicts_as_one_built_the_slow_way(tmp_path):
    import torch

    from d2retrain.model.d2 import Detectron2Predictor
    from d2retrain.model.specs import model_spec

    architecture = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
    spec = model_spec(
        filled("model", {"architecture": architecture, "min_size_test": 192, "max_size_test": 256}),
        "detectron2",
    )
    options = {"device": "cpu", "score_threshold": 0.0, "max_detections": 5}
    torch.manual_seed(0)  # some random draws find nothing in the image
    slow = Detectron2Predictor(None, spec, len(CLASSES), **options)  # randomly initialised
    torch.save({"model": slow.model.state_dict()}, tmp_path / "model.pth")
    init_functions = {name: getattr(torch.nn.init, name) for name in ("kaiming_uniform_", "normal_", "ones_")}
    loaded = Detectron2Predictor(tmp_path / "model.pth", spec, len(CLASSES), **options)
    assert {name: getattr(torch.nn.init, name) for name in init_functions} == init_functions  # restored
    state = loaded.model.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in slow.model.state_dict().items())
    image = load_image(sorted((COCO_MINI / "val2017").glob("*.jpg"))[0])
    got, expected = loaded(image), slow(image)
    assert len(got) == len(expected) > 0
    np.testing.assert_array_equal(got.scores, expected.scores)
    np.testing.assert_array_equal(got.masks, expected.masks)


@pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are set on Linux only")
def test_reading_ahead_and_writing_behind_run_at_the_lowest_priority_and_the_model_thread_does_not():
    from concurrent.futures import ThreadPoolExecutor

    from d2retrain.infer.videoio import ahead, yield_to_the_model

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = niceness()
    seen = []

    def items():
        seen.append(niceness())
        yield from range(3)

    assert list(ahead(items())) == [0, 1, 2]
    with ThreadPoolExecutor(1, "write", yield_to_the_model) as writer:
        seen.append(writer.submit(niceness).result())
    assert seen == [19, 19]
    assert niceness() == before


def test_the_real_video_gives_h264_yuv420p_with_its_rate_and_frame_count(demo_model, tmp_path):
    model, _ = demo_model
    options = inference_options(filled("inference", OPTIONS | {"max_frames": 12, "save_frames": True}))
    (status,) = run_inference(model, [], [VIDEO], tmp_path, options, CLASSES)
    assert (status.status, status.frames) == ("ok", 12)
    output = tmp_path / "videos" / "one-by-one-person-detection.mp4"
    with av.open(str(output)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert stream.average_rate == Fraction(10) and (stream.width, stream.height) == (768, 432)
        assert sum(1 for _ in container.decode(stream)) == 12
    lines = [
        json.loads(line) for line in (tmp_path / "videos" / f"{VIDEO.stem}.jsonl").read_text().splitlines()
    ]
    assert [line["frame"] for line in lines] == list(range(12))
    assert lines[3]["time"] == pytest.approx(0.3)
    frames = sorted((tmp_path / "videos").glob(f"{VIDEO.stem}_frame_*.png"))
    assert [f.name for f in frames] == [f"{VIDEO.stem}_frame_{i:04d}.png" for i in range(12)]
    shorter = inference_options(filled("inference", OPTIONS | {"max_frames": 3, "save_frames": True}))
    run_inference(model, [], [VIDEO], tmp_path, shorter, CLASSES)  # a rerun drops the stale frames
    assert len(list((tmp_path / "videos").glob(f"{VIDEO.stem}_frame_*.png"))) == 3


def test_temporaries_a_killed_run_left_of_its_files_are_removed_and_others_kept(demo_model, tmp_path):
    model, layout = demo_model
    image = sorted(layout.images("val").glob("*.jpg"))[0]
    left = {
        "images": [f".{image.stem}.png.abcdefgh.tmp", f".{image.stem}.json.abcdefgh.tmp"],
        "videos": [f".{VIDEO.stem}.mp4.abcdefgh.tmp", f".{VIDEO.stem}_frame_0003.png.abcdefgh.tmp"],
    }
    others = {  # another image's, another video's (a longer name)
        "images": [".other.png.abcdefgh.tmp"],
        "videos": [f".{VIDEO.stem}x.mp4.abcdefgh.tmp", f".{VIDEO.stem}.mp4.mp4.abcdefgh.tmp"],
    }
    for folder in ("images", "videos"):
        (tmp_path / folder).mkdir()
        for name in left[folder] + others[folder]:
            (tmp_path / folder / name).write_bytes(b"partial")
    options = inference_options(filled("inference", OPTIONS | {"max_frames": 2}))
    statuses = run_inference(model, [image], [VIDEO], tmp_path, options, CLASSES)
    assert [s.status for s in statuses] == ["ok", "ok"]
    for folder in ("images", "videos"):
        hidden = sorted(p.name for p in (tmp_path / folder).iterdir() if p.name.startswith("."))
        assert hidden == sorted(others[folder])


def test_an_odd_sized_video_is_padded_to_even_for_yuv420p(demo_model, tmp_path):
    model, _ = demo_model
    odd = tmp_path / "odd.mp4"
    with av.open(str(odd), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 65, 49, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((49, 65, 3), 120, np.uint8), format="bgr24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    (status,) = run_inference(
        model, [], [odd], tmp_path / "out", inference_options(filled("inference", OPTIONS)), CLASSES
    )
    assert status.status == "ok" and status.frames == 3
    with av.open(str(tmp_path / "out" / "videos" / "odd.mp4")) as container:
        assert (container.streams.video[0].width, container.streams.video[0].height) == (66, 50)


def _bad_files(folder, layout):
    good = folder / "ünï cödé name.jpg"
    shutil.copy(next(layout.images("val").glob("*.jpg")), good)
    jpeg = next(COCO_MINI.glob("val2017/*.jpg")).read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "garbage.jpg").write_bytes(b"\x00" * 512)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    shutil.copy(layout.video, folder / "clip with space.mp4")
    images = [good, *(folder / n for n in ("truncated.jpg", "empty.png", "notes.txt", "garbage.jpg"))]
    return images, [folder / "empty.mp4", folder / "noise.mp4", folder / "clip with space.mp4"]


def test_bad_files_are_reported_and_never_stop_the_others(demo_model, tmp_path):
    model, layout = demo_model
    images, videos = _bad_files(tmp_path, layout)
    status_path = tmp_path / "out" / "status" / "shard_00.json"  # a shard job of the workflow
    statuses = infer_shard(
        str(model),
        [str(p) for p in images],
        [str(p) for p in videos],
        str(status_path),
        inference_options(filled("inference", OPTIONS)),
        CLASSES,
    )
    by_name = {s.name: s for s in statuses}
    assert by_name["ünï cödé name"].status == "ok" and by_name["clip with space"].status == "ok"
    assert by_name["clip with space"].frames == 12
    expected_errors = {
        "truncated": "truncated",
        "empty": "empty file",
        "notes": "unsupported file type",
        "garbage": "not a readable image",
        "noise": "not a readable video",
    }
    for name, words in expected_errors.items():
        assert by_name[name].status == "error" and words in by_name[name].error, by_name[name]
    for name in ("truncated", "empty", "notes", "garbage"):
        record = json.loads((tmp_path / "out" / "images" / f"{name}.json").read_text())
        assert record["status"] == "error" and record["instances"] == [] and record["error"]
        assert cv2.imread(str(tmp_path / "out" / "images" / f"{name}.png")) is not None  # says "not inferred"
    for name in ("empty", "noise"):
        (line,) = (tmp_path / "out" / "videos" / f"{name}.jsonl").read_text().splitlines()
        assert json.loads(line)["status"] == "error"
    assert {row["name"] for row in json.loads(status_path.read_text()) if row["status"] != "ok"} == {
        *expected_errors,
        "empty",
    }
    summary = write_summary([status_path], tmp_path / "summary.csv")
    assert list(summary.status) == ["error"] * 6 + ["ok"] * 2  # problems first
    assert pd.read_csv(tmp_path / "summary.csv").name.tolist() == summary.name.tolist()


def test_a_video_cut_short_keeps_its_frames_and_says_it_was_truncated(demo_model, tmp_path):
    model, _ = demo_model
    source = tmp_path / "source.mp4"
    with (
        av.open(str(VIDEO)) as container_in,
        av.open(str(source), "w", options={"movflags": "+faststart"}) as out,
    ):
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 768, 432, "yuv420p"
        for index, frame in enumerate(container_in.decode(video=0)):
            if index == 30:
                break
            out.mux(
                stream.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="bgr24"), format="bgr24"))
            )
        out.mux(stream.encode())
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size * 2 // 3])
    (status,) = run_inference(
        model, [], [cut], tmp_path / "out", inference_options(filled("inference", OPTIONS)), CLASSES
    )
    assert status.status == "truncated" and 0 < status.frames < 30, status
    lines = [
        json.loads(line) for line in (tmp_path / "out" / "videos" / "cut.jsonl").read_text().splitlines()
    ]
    assert len(lines) == status.frames + 1 and lines[-1]["status"] == "truncated"
    with av.open(str(tmp_path / "out" / "videos" / "cut.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == status.frames


def test_exif_orientation_is_applied_like_detectron2(tmp_path):
    from PIL import Image

    picture = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = picture.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    picture.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").shape == (40, 20, 3)


@pytest.mark.parametrize(
    ("specs", "message"),
    [(["missing/folder"], "neither a folder"), (["{d}/a.jpg", "{d}/sub/a.png"], "would both write")],
)
def test_discover_refuses_missing_inputs_and_clashing_names(tmp_path, specs, message):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "sub" / "a.png").write_bytes(b"x")
    with pytest.raises(D2RetrainError, match=message):
        discover([spec.format(d=tmp_path) for spec in specs], "image")


def test_discover_lists_folders_by_type_takes_globs_and_files_as_given(tmp_path):
    for name in ("b.jpg", "a.PNG", "readme.txt", "c.mp4"):
        (tmp_path / name).write_bytes(b"x")
    assert [f.name for f in discover([str(tmp_path)], "image")] == ["a", "b"]
    assert [f.name for f in discover([str(tmp_path / "*.txt")], "image")] == ["readme"]
    assert [f.name for f in discover([str(tmp_path / "c.mp4"), str(tmp_path)], "video")] == ["c"]


def test_infer_command_writes_outputs_and_exits_1_when_a_file_failed(demo_model, tmp_path, capsys):
    model, layout = demo_model
    good = next(layout.images("val").glob("*.jpg"))
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    arguments = ["infer", "--model", str(model), "-o", str(tmp_path / "out"), "--score-threshold", "0.01"]
    assert main([*arguments, "-i", str(good), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "images" / f"{good.stem}.png").is_file()
    assert main([*arguments, "-i", str(good), str(tmp_path / "bad.jpg"), "-v", str(layout.video)]) == 1
    assert (tmp_path / "out" / "videos" / "demo.mp4").is_file()


@pytest.mark.slow
def test_infer_command_writes_the_images_predictions_as_a_coco_dataset(demo_model, tmp_path):
    from pycocotools.coco import COCO

    model, layout = demo_model
    images = sorted(layout.images("val").glob("*.jpg"))
    other = tmp_path / "other" / "deeper"  # a second folder: names relative to the common one
    other.mkdir(parents=True)
    shutil.copy(images[0], other / "copy.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    out = tmp_path / "out"
    inputs = [*map(str, images), str(other / "copy.jpg"), str(tmp_path / "bad.jpg")]
    arguments = ["infer", "--model", str(model), "-o", str(out), "--score-threshold", "0.01"]
    arguments += ["-i", *inputs, "-v", str(layout.video), "--coco-out", str(tmp_path / "p.json")]
    assert main(arguments) == 1  # the bad file

    coco = COCO(str(tmp_path / "p.json"))  # pycocotools loads it as a dataset
    document = json.loads((tmp_path / "p.json").read_text())
    assert document["categories"] == [
        {"id": 1, "name": "person", "supercategory": "", "source_id": 1},
        {"id": 2, "name": "sports ball", "supercategory": "", "source_id": 37},
    ]
    root = Path(document["info"]["image_root"])
    assert root == Path(os.path.commonpath([layout.images("val"), other]))
    listed = sorted(Path(root, image["file_name"]) for image in document["images"])
    assert listed == sorted([*images, other / "copy.jpg"])  # the bad file and the video are left out
    expected = 0
    for image in document["images"]:
        name = Path(image["file_name"]).stem
        predicted = json.loads((out / "images" / f"{name}.json").read_text())["instances"]
        expected += len(predicted)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert [a["score"] for a in annotations] == [p["score"] for p in predicted]
        assert [coco.cats[a["category_id"]]["source_id"] for a in annotations] == [
            p["category_id"] for p in predicted
        ]
        for annotation in annotations:
            mask = coco.annToMask(annotation)
            assert (
                mask.shape
                == (image["height"], image["width"])
                == cv2.imread(str(root / image["file_name"])).shape[:2]
            )
            assert annotation["area"] == mask.sum() and annotation["iscrowd"] == 0
    assert len(coco.anns) == expected > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [("no_classes", "classes.json"), ("other_classes", "trained for")],
)
def test_infer_command_refuses_a_model_without_or_with_other_classes(
    demo_model, tmp_path, capsys, change, message
):
    model, layout = demo_model
    copy = tmp_path / "model"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("checkpoints"))
    classes = ["car", "person"] if change == "other_classes" else CLASSES
    if change == "no_classes":
        (copy / "classes.json").unlink()
    arguments = ["infer", "--model", str(copy), "-o", str(tmp_path / "out"), "--classes", *classes]
    assert main([*arguments, "-i", str(next(layout.images("val").glob("*.jpg")))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_coco_file_names_never_climb_out_of_their_root():
    from d2retrain.infer.cocoout import _image_root

    assert _image_root(["resources/demo/val/a.jpg", "resources/demo/val/b/c.jpg"]) == "resources/demo/val"
    root = _image_root(["../photos/a.jpg", "resources/demo/val/b.jpg"])  # a folder beside the workdir
    assert os.path.isabs(root)
    assert not os.path.relpath(os.path.abspath("../photos/a.jpg"), root).startswith("..")


def assert_same_instances(found: list[dict], expected: list[dict], threshold: float) -> None:
    """Same instances (COCO records): scores within 1e-5, boxes within 0.01 px, mask IoU >= 0.999;
    an instance within 1e-5 of the score threshold may be on one side only."""
    kept = [[r for r in records if r["score"] >= threshold + 1e-5] for records in (found, expected)]
    assert len(kept[0]) == len(kept[1]), (len(kept[0]), len(kept[1]))
    unmatched = list(kept[1])
    for record in kept[0]:
        match = next(
            (
                other
                for other in unmatched
                if other["category_id"] == record["category_id"]
                and abs(other["score"] - record["score"]) <= 1e-5
                and np.allclose(other["bbox"], record["bbox"], atol=0.01)
            ),
            None,
        )
        assert match is not None, record["bbox"]
        unmatched.remove(match)
        iou = mask_utils.iou([record["segmentation"]], [match["segmentation"]], [0])[0][0]
        assert iou >= 0.999 or (
            mask_utils.area(record["segmentation"]) == 0 == mask_utils.area(match["segmentation"])
        )


@pytest.mark.slow
def test_mixed_sizes_in_one_batch_would_change_predictions_so_batches_hold_one_input_size(
    demo_model, tmp_path
):
    from d2retrain.model.engines import load_predictor

    model, _ = demo_model
    predictor, _ = load_predictor(model, device="cpu", score_threshold=0.0, max_detections=100)
    images = [load_image(path) for path in mixed_photos(tmp_path)]
    padded_together = predictor._forward(images)  # one forward pass of every size: padding leaks
    assert_batches_predict_as_alone(predictor, images, padded_together)


def assert_batches_predict_as_alone(predictor, images: list[np.ndarray], padded_together: list) -> None:
    """One forward pass of all the images changes some image's predictions; ``predict_batch``
    predicts each as alone."""
    alone = [predictor(image) for image in images]
    assert any(
        len(a) != len(b) or not np.allclose(a.scores, b.scores, atol=1e-5)
        for a, b in zip(alone, padded_together, strict=True)
    )
    for got, expected in zip(predictor.predict_batch(images), alone, strict=True):
        assert len(got) == len(expected)
        np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)
        np.testing.assert_allclose(got.boxes, expected.boxes, atol=0.01)


@pytest.mark.slow
def test_a_files_predictions_are_the_same_alone_at_every_batch_size_and_shard_count(demo_model, tmp_path):
    model, _ = demo_model
    photos = [InputFile.of(path, "image") for path in mixed_photos(tmp_path / "in")]
    options = OPTIONS | {"score_threshold": 0.01, "max_detections": 20}

    def predicted(folder: Path, batch_size: int, count: int) -> dict[str, list[dict]]:
        for group in shards(photos, count).values():
            run_inference(
                model,
                group,
                [],
                folder,
                inference_options(filled("inference", options | {"batch_size": batch_size})),
            )
        return {
            item.name: json.loads((folder / "images" / f"{item.name}.json").read_text())["instances"]
            for item in photos
        }

    alone = {}
    for item in photos:  # each file in a job of its own
        alone |= predicted_one(model, item, tmp_path / "alone", options)
    assert sum(len(records) for records in alone.values()) > 0
    runs = [(batch, 1) for batch in (1, 2, 4, 8)] + [(4, count) for count in (2, 3)]
    for batch_size, count in runs:
        found = predicted(tmp_path / f"b{batch_size}_s{count}", batch_size, count)
        for name, records in found.items():
            assert_same_instances(records, alone[name], options["score_threshold"])


def predicted_one(model: Path, item: InputFile, folder: Path, options: dict) -> dict[str, list[dict]]:
    run_inference(
        model, [item], [], folder, inference_options(filled("inference", options | {"batch_size": 1}))
    )
    return {item.name: json.loads((folder / "images" / f"{item.name}.json").read_text())["instances"]}


@pytest.mark.detectron2
def test_detectron2_batches_hold_one_input_size_too(tmp_path):
    import torch

    from d2retrain.model.d2 import Detectron2Predictor
    from d2retrain.model.specs import model_spec

    architecture = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
    spec = model_spec(filled("model", {"architecture": architecture}), "detectron2")  # 192, cap 360
    torch.manual_seed(0)  # random weights: many low-score instances to compare
    predictor = Detectron2Predictor(
        None, spec, len(CLASSES), device="cpu", score_threshold=0.0, max_detections=100
    )
    images = [load_image(path) for path in mixed_photos(tmp_path)]
    inputs = [{"image": predictor.input_tensor(i), "height": i.shape[0], "width": i.shape[1]} for i in images]
    assert_batches_predict_as_alone(predictor, images, predictor._forward(inputs))


def test_a_rerun_infers_only_the_files_whose_content_model_or_output_options_changed(demo_model, tmp_path):
    import torch

    model, layout = demo_model
    folder = tmp_path / "in"
    shutil.copytree(layout.images("val"), folder)
    video = shutil.copy(layout.video, tmp_path / "clip.mp4")
    out = tmp_path / "out"
    base = OPTIONS | {"max_frames": 3}

    def run(options: dict = base, model_dir: Path = model) -> set[str]:
        """Runs with reuse; returns the names whose outputs were written again."""
        before = {p.name: p.stat().st_ino for p in out.rglob("*") if p.is_file()}
        images = sorted(folder.glob("*.jpg"))
        statuses = run_inference(
            model_dir,
            images,
            [video],
            out,
            inference_options(filled("inference", options)),
            CLASSES,
            reuse=True,
        )
        assert {s.status for s in statuses} == {"ok"} and len(statuses) == len(images) + 1
        written = {p.name for p in out.rglob("*") if p.is_file() and before.get(p.name) != p.stat().st_ino}
        return {name.rsplit(".", 1)[0] for name in written if not name.startswith(".")}

    names = {p.stem for p in folder.glob("*.jpg")} | {"clip"}
    assert run() == names  # the first run infers everything and records it
    assert run() == set()  # nothing changed: nothing inferred, the model not even loaded
    shutil.copy(folder / "demo_val_0001.jpg", folder / "added.jpg")
    assert run() == {"added"}
    os.utime(folder / "demo_val_0002.jpg", ns=(1, 1))  # a touch: same bytes
    assert run() == set()
    jpeg = cv2.imread(str(folder / "demo_val_0002.jpg"))
    cv2.imwrite(str(folder / "demo_val_0002.jpg"), cv2.flip(jpeg, 1))  # new content
    assert run() == {"demo_val_0002"}
    assert run(base | {"batch_size": 3, "device": "cpu"}) == set()  # changes no output
    assert run(base | {"max_frames": 2}) == {"clip"}  # a video option: the video only
    (out / "images" / ".demo_val_0003.record.json").unlink()  # as a kill between outputs and record
    assert run(base | {"max_frames": 2}) == {"demo_val_0003"}
    assert run(base | {"max_frames": 2, "score_threshold": 0.02}) == names | {"added"}

    other = tmp_path / "other_model"  # another model: everything again
    shutil.copytree(model, other)
    state = torch.load(other / "model.pth", weights_only=True)  # the served weights
    state["model"]["roi_heads.box_predictor.cls_score.bias"] += 0.01
    torch.save(state, other / "model.pth")
    assert run(base | {"max_frames": 2, "score_threshold": 0.02}, other) == names | {"added"}

    kept = {p.name: json.loads(p.read_text())["instances"] for p in (out / "images").glob("[!.]*.json")}
    fresh = tmp_path / "fresh"  # what was kept equals what a run without reuse writes
    options = inference_options(filled("inference", base | {"max_frames": 2, "score_threshold": 0.02}))
    run_inference(other, sorted(folder.glob("*.jpg")), [], fresh, options, CLASSES)
    for name, records in kept.items():
        assert_same_instances(records, json.loads((fresh / "images" / name).read_text())["instances"], 0.02)


def test_outputs_of_inputs_no_longer_there_are_removed_and_only_those(demo_model, tmp_path):
    from d2retrain.infer.reuse import remove_stale

    model, layout = demo_model
    images = [InputFile.of(path, "image") for path in sorted(layout.images("val").glob("*.jpg"))]
    videos = [InputFile.of(layout.video, "video")]
    options = inference_options(filled("inference", OPTIONS | {"max_frames": 2, "save_frames": True}))
    run_inference(model, images, videos, tmp_path, options, CLASSES, reuse=True)
    (tmp_path / "images" / "mine.txt").write_text("a user's file")
    assert remove_stale(tmp_path, images + videos) == 0
    assert remove_stale(tmp_path, images[1:]) == 2  # the first image and the video are gone
    left = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    gone = {
        n for n in left if n.startswith((f"{images[0].name}.", f".{images[0].name}.", "demo.", "demo_frame"))
    }
    assert gone == set() and ".demo.record.json" not in left
    assert {f"{item.name}.json" for item in images[1:]} | {"mine.txt"} <= left


# The model of these tests is trained for two iterations: it scores everything low, so the tracker's
# thresholds are lowered with the inference threshold (OPTIONS).
LOW_TRACKER = {
    "track_activation_threshold": 0.02,
    "high_score_threshold": 0.02,
    "low_score_threshold": 0.005,
}


def test_tracking_writes_track_ids_and_mot_files_the_same_for_a_video_and_its_frames_and_leaves_images_alone(
    demo_model, tmp_path
):
    model, layout = demo_model
    frames = tmp_path / "frames" / "img1"  # a MOTChallenge sequence: frames, and seqinfo.ini above
    frames.mkdir(parents=True)
    (frames.parent / "seqinfo.ini").write_text("[Sequence]\nname=demo-frames\nframeRate=10\nseqLength=12\n")
    with av.open(str(layout.video)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            cv2.imwrite(str(frames / f"{index + 1:06d}.png"), frame.to_ndarray(format="bgr24"))
    images = sorted(layout.images("val").glob("*.jpg"))[:2]
    (video_input,) = discover([str(frames)], "video")  # a folder of frames is one video
    assert (video_input.path, video_input.name) == (str(frames), "frames")  # the sequence's name
    untracked = inference_options(filled("inference", OPTIONS))
    out = tmp_path / "out"
    run_inference(model, images, [layout.video, video_input], out, untracked, CLASSES, reuse=True)
    drawn = {path: path.stat().st_mtime_ns for path in (out / "images").iterdir()}
    assert not list((out / "videos").glob("*.tracks.*"))
    tracked = inference_options(
        filled("inference", OPTIONS | {"track": True, "tracker": LOW_TRACKER, "trail_frames": 5})
    )
    statuses = run_inference(model, images, [layout.video, video_input], out, tracked, CLASSES, reuse=True)
    # images are kept from the first run: tracking changes videos only
    assert {path: path.stat().st_mtime_ns for path in (out / "images").iterdir()} == drawn
    by_name = {status.name: status for status in statuses}
    for name in ("demo", "frames"):
        lines = [json.loads(line) for line in (out / "videos" / f"{name}.jsonl").read_text().splitlines()]
        assert [line["frame"] for line in lines] == list(range(12))
        ids = [i["track_id"] for line in lines for i in line["instances"]]
        assert ids and all(i is None or (isinstance(i, int) and i >= 1) for i in ids)
        rows = [row.split(",") for row in (out / "videos" / f"{name}.tracks.csv").read_text().splitlines()]
        assert rows and all(len(row) == 10 and row[7:] == ["-1", "-1", "-1"] for row in rows)
        # the MOT file holds exactly the JSONL's instances that are in a track, frames from 1
        in_tracks = sorted(
            (line["frame"] + 1, i["track_id"]) for line in lines for i in line["instances"] if i["track_id"]
        )
        assert sorted((int(row[0]), int(row[1])) for row in rows) == in_tracks
        described = json.loads((out / "videos" / f"{name}.tracks.json").read_text())
        assert described["frames"] == 12 and described["rate"] == 10.0
        assert {t["id"] for t in described["tracks"]} == {int(row[1]) for row in rows}
        for track in described["tracks"]:
            assert track["length"] == sum(1 for row in rows if int(row[1]) == track["id"])
            assert track["class"] == max(track["classes"], key=track["classes"].get)
        assert by_name[name].instances == sum(len(line["instances"]) for line in lines)  # those written
        counts = {name: n for name, n in described["tracks_per_class"].items() if n}
        assert by_name[name].tracks == ", ".join(f"{c} {n}" for c, n in counts.items())
        with av.open(str(out / "videos" / f"{name}.mp4")) as container:
            assert sum(1 for _ in container.decode(video=0)) == 12
    # the same frames give the same tracks, from a video file or from a folder of frames
    assert (out / "videos" / "demo.tracks.csv").read_text() == (
        out / "videos" / "frames.tracks.csv"
    ).read_text()
    # a killed run that lost a track file is not taken as complete: that video is inferred again
    (out / "videos" / "demo.tracks.json").unlink()
    again = run_inference(model, images, [layout.video, video_input], out, tracked, CLASSES, reuse=True)
    assert (out / "videos" / "demo.tracks.json").is_file() and again[2].tracks == by_name["demo"].tracks
    # tracking off again: the track files go, the images stay
    run_inference(model, images, [layout.video, video_input], out, untracked, CLASSES, reuse=True)
    assert not list((out / "videos").glob("*.tracks.*"))
    assert {path: path.stat().st_mtime_ns for path in (out / "images").iterdir()} == drawn


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to compare with one")
def test_a_drawn_video_is_the_same_bytes_whatever_the_cpus_the_job_is_given(tmp_path):
    """x264's output depends on its thread count, by default the CPUs it sees: a SLURM job given
    one CPU encoded other bytes than a local run. The writer fixes the count."""
    script = (
        "import os, sys\n"
        "import numpy as np\n"
        "from fractions import Fraction\n"
        "from d2retrain.infer.videoio import VideoWriter\n"
        "os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: int(sys.argv[2])]))\n"
        "import cv2\n"
        "noise = np.random.default_rng(0).integers(0, 255, (9, 16, 3), dtype=np.uint8)\n"
        "picture = cv2.resize(noise, (640, 360))\n"
        "with VideoWriter(sys.argv[1], Fraction(10), 640, 360) as video:\n"
        "    for index in range(12):\n"
        "        video.write(np.roll(picture, 7 * index, axis=1))\n"
    )
    for cpus in (1, 2):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{cpus}.mp4"), str(cpus)], check=True)
    assert (tmp_path / "1.mp4").read_bytes() == (tmp_path / "2.mp4").read_bytes()
