"""The embedded demo dataset."""

import inspect

import av
import numpy as np
import pandas as pd

from d2retrain.data.coco import read_coco
from d2retrain.data.demo import VIDEO_SIZE, write_demo_dataset
from d2retrain.data.stats import category_counts

GROUND_TRUTH_COLUMNS = ["frame", "id", "left", "top", "width", "height", "flag", "category", "visibility"]


def read_ground_truth(path) -> pd.DataFrame:
    """A MOTChallenge ground-truth file as a table (a row per object per frame)."""
    return pd.read_csv(path, header=None, names=GROUND_TRUTH_COLUMNS)


def crossings(truth: pd.DataFrame) -> set[tuple[int, int]]:
    """Pairs of tracks whose left-right order swaps between two frames holding both, with their
    boxes overlapping in one of those two frames."""
    boxes = truth.assign(
        right=truth.left + truth.width, bottom=truth.top + truth.height, centre=truth.left + truth.width / 2
    )
    pairs = boxes.merge(boxes, on="frame", suffixes=("", "_other"))
    pairs = pairs[pairs.id < pairs.id_other].sort_values(["id", "id_other", "frame"])
    pairs = pairs.assign(
        order=np.sign(pairs.centre - pairs.centre_other),
        overlap=(np.minimum(pairs.right, pairs.right_other) > np.maximum(pairs.left, pairs.left_other))
        & (np.minimum(pairs.bottom, pairs.bottom_other) > np.maximum(pairs.top, pairs.top_other)),
    )
    pairs = pairs[pairs.order != 0]
    by_pair = pairs.groupby(["id", "id_other"])
    swapped = by_pair.order.diff().fillna(0) != 0
    overlapping = pairs.overlap | by_pair.overlap.shift(1, fill_value=False)
    hits = pairs[swapped & overlapping]
    return set(zip(hits.id.tolist(), hits.id_other.tolist(), strict=True))


def decoded_frames(video) -> int:
    with av.open(str(video)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


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


def test_demo_video_has_tracks_that_cross_and_hide_and_its_ground_truth_is_deterministic(tmp_path):
    layout = write_demo_dataset(tmp_path / "a", train=1, val=1)
    again = write_demo_dataset(tmp_path / "b", train=1, val=1)
    assert layout.video_ground_truth.read_bytes() == again.video_ground_truth.read_bytes()
    truth = read_ground_truth(layout.video_ground_truth)
    frames = decoded_frames(layout.video)
    assert frames == inspect.signature(write_demo_dataset).parameters["video_frames"].default
    assert truth.frame.between(1, frames).all() and set(truth.frame) == set(range(1, frames + 1))
    tracks = truth.groupby("id").category.agg(["first", "nunique"])
    assert len(tracks) >= 6 and sorted(tracks.index) == list(range(1, len(tracks) + 1))
    assert (tracks["nunique"] == 1).all() and set(tracks["first"]) == {1, 37}
    assert len(crossings(truth)) >= 4
    gaps = truth.sort_values(["id", "frame"]).groupby("id").frame.diff() - 1
    assert gaps.max() >= 5, "an object hidden for 5 frames or more reappears"
    width, height = VIDEO_SIZE
    assert (truth.left >= 0).all() and (truth.top >= 0).all()
    assert (truth.width > 0).all() and (truth.height > 0).all()
    assert (truth.left + truth.width <= width).all() and (truth.top + truth.height <= height).all()
    assert (truth.flag == 1).all() and truth.visibility.between(0.3, 1).all()
    assert (truth.visibility < 1).any(), "some objects are partly hidden"


def test_crossings_need_a_swap_of_overlapping_boxes():
    rows = [  # track 1 passes track 2 (overlapping), track 3 swaps with 1 far below, 4 never swaps
        (frame, track, left, top, 10, 10, 1, 1, 1.0)
        for frame in (1, 2, 3)
        for track, left, top in ((1, 10 * frame, 0), (2, 25 - 2 * frame, 5), (3, 18, 100), (4, 200, 0))
    ]
    truth = pd.DataFrame(rows, columns=GROUND_TRUTH_COLUMNS)
    assert crossings(truth) == {(1, 2)}


def test_a_two_frame_demo_video_has_ground_truth_for_its_two_frames(tmp_path):
    layout = write_demo_dataset(tmp_path, train=1, val=1, video_frames=2)
    truth = read_ground_truth(layout.video_ground_truth)
    assert decoded_frames(layout.video) == 2
    assert set(truth.frame) == {1, 2} and truth.id.nunique() >= 4


def test_a_longer_demo_video_shows_its_objects_leaving(tmp_path):
    layout = write_demo_dataset(tmp_path, train=1, val=1, video_frames=130)
    truth = read_ground_truth(layout.video_ground_truth)
    assert decoded_frames(layout.video) == 130
    in_frame = truth.groupby("frame").id.nunique()
    assert in_frame.iloc[0] == 6 and in_frame.iloc[-1] < 3  # objects walk, roll and fly out of the picture


def test_a_demo_test_split_leaves_train_and_val_as_they_were(tmp_path):
    plain = write_demo_dataset(tmp_path / "a", train=4, val=3, video_frames=2)
    tested = write_demo_dataset(tmp_path / "b", train=4, val=3, video_frames=2, test=5)
    for split in ("train", "val"):
        assert plain.annotations(split).read_bytes() == tested.annotations(split).read_bytes()
    test = read_coco(tested.annotations("test"))
    assert len(test.images) == 5 and len(list(tested.images("test").glob("*.jpg"))) == 5
    ids = {int(i) for split in ("train", "val") for i in read_coco(tested.annotations(split)).image_ids}
    assert not ids & {int(i) for i in test.image_ids} and not (tmp_path / "a" / "test").exists()
