"""The embedded demo dataset."""

import av

from d2retrain.data.coco import read_coco
from d2retrain.data.demo import write_demo_dataset
from d2retrain.data.stats import category_counts


def test_demo_dataset_is_deterministic_and_shaped_as_promised(tmp_path):
    first = write_demo_dataset(tmp_path / "a", train=24, val=8, video_frames=12)
    second = write_demo_dataset(tmp_path / "b", train=24, val=8, video_frames=12)
    for split in ("train", "val"):
        assert first.annotations(split).read_bytes() == second.annotations(split).read_bytes()
    train = read_coco(first.annotations("train"))
    assert {c.name for c in train.categories} == {"person", "car", "sports ball"}
    counts = category_counts(train).set_index("category")["instances"]
    assert counts["person"] > counts["sports ball"] > 0 and counts["car"] > 0
    assert train.table.iscrowd.any(), "some crowd RLE regions"
    per_image = {}
    for image_id, category_id in zip(
        train.table.image_ids.tolist(), train.table.category_ids.tolist(), strict=True
    ):
        per_image.setdefault(image_id, set()).add(category_id)
    assert any(cats == {1} for cats in per_image.values()) and any(
        cats == {37} for cats in per_image.values()
    )
    assert any({1, 37} <= cats for cats in per_image.values())
    assert all((first.images("train") / name).is_file() for name in train.file_names)
    with av.open(str(first.video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert sum(1 for _ in container.decode(stream)) == 12


def test_demo_images_and_video_come_in_mixed_sizes_and_orientations(tmp_path):
    import cv2
    from pycocotools.coco import COCO

    layout = write_demo_dataset(tmp_path, train=8, val=8, video_frames=2)
    coco = COCO(str(layout.annotations("train")))
    sizes = set()
    for image in coco.dataset["images"]:
        picture = cv2.imread(str(layout.images("train") / image["file_name"]))
        assert picture.shape[:2] == (image["height"], image["width"])
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            mask = coco.annToMask(annotation)
            assert mask.shape == picture.shape[:2] and mask.any()
        sizes.add((image["width"], image["height"]))
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)  # landscape and portrait
    assert any(w % 32 or h % 32 for w, h in sizes) and len(sizes) >= 6
    assert any(min(w, h) > 192 for w, h in sizes) and any(
        max(w, h) > 360 for w, h in sizes
    )  # above the test size
    with av.open(str(layout.video)) as container:
        stream = container.streams.video[0]
        assert stream.width % 32 and stream.height % 32
