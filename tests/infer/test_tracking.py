"""Tracks across frames (ByteTrack through ``trackers``) and their score against ground truth
(``d2retrain track-eval``): ids, classes and written files on scenes built here, exact scores on
files whose answer is known, and one clear line for bad input."""

import json

import numpy as np
import pytest
from helpers import filled

from d2retrain.cli import main
from d2retrain.core.errors import D2RetrainError
from d2retrain.infer.track import VideoTracker, tracker_options
from d2retrain.infer.trackscore import score_tracks
from d2retrain.model.instances import Instances

HEIGHT, WIDTH = 120, 320
NAMES = ("person", "sports ball")


def _instances(detections: list[tuple[float, float, float, float, float, int]]) -> Instances:
    """Instances from (x0, y0, x1, y1, score, class) tuples, with box-shaped masks."""
    boxes = np.array([d[:4] for d in detections], np.float32).reshape(-1, 4)
    masks = np.zeros((len(detections), HEIGHT, WIDTH), bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.astype(int), strict=True):
        mask[y0:y1, x0:x1] = True
    return Instances(
        boxes,
        np.array([d[4] for d in detections], np.float32),
        np.array([d[5] for d in detections], np.int64),
        masks,
    )


def _scene() -> list[list[tuple]]:
    """30 frames: A walks right, B walks left in the same band; B is hidden behind A while they
    overlap (7 frames without B), A's detection scores 0.35 once (a blurred frame) and is a sports
    ball in 3 frames, and a stray low-scored box shows up once far from both."""
    frames = []
    for index in range(30):
        a_x, b_x = 20 + 8 * index, 280 - 8 * index
        a_class = 1 if index in (3, 4, 5) else 0
        a = (a_x, 30, a_x + 24, 90, 0.35 if index == 10 else 0.9, a_class)
        b = (b_x, 32, b_x + 22, 88, 0.85, 0)
        detections = [a] if abs(a_x - b_x) < 28 else [a, b]
        if index == 20:
            detections.append((290, 0, 318, 20, 0.4, 1))
        frames.append(detections)
    return frames


def _track(frames: list[list[tuple]], **tracker) -> list:
    options = tracker_options(filled("inference", {"tracker": tracker})["tracker"])
    video = VideoTracker(options, rate=10, score_threshold=0.5, trail_frames=4)
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    settled = []
    for index, detections in enumerate(frames):
        settled += video.push(index, image, _instances(detections))
    settled += video.finish()
    return settled, video


def test_each_object_keeps_one_id_through_a_crossing_and_an_occlusion_and_one_class():
    settled, video = _track(_scene())
    assert [frame.index for frame in settled] == list(range(30))  # each frame once, in order
    a_ids, b_ids = set(), set()
    for frame, detections in zip(settled, _scene(), strict=True):
        boxes, ids = frame.instances.boxes, frame.track_ids.tolist()
        for box, track_id in zip(boxes, ids, strict=True):
            expected = [d for d in detections if abs(d[0] - box[0]) < 1e-3]
            assert len(expected) == 1
            (a_ids if expected[0] == detections[0] else b_ids).add(track_id)
    # the first frame's detections are named too (ByteTrack confirms a track on its second one)
    assert a_ids == {1} and b_ids == {2}
    # the 0.35 detection joined A's track (ByteTrack's low-score stage); the stray 0.4 box did not
    assert len(settled[10].instances) == 2 and settled[10].track_ids.tolist()[0] == 1
    assert settled[20].instances.scores.min() > 0.5
    tracks = video.tracks(NAMES)
    assert [(t["id"], t["class"], t["first_frame"], t["last_frame"]) for t in tracks] == [
        (1, "person", 0, 29),
        (2, "person", 0, 29),
    ]
    assert tracks[0]["classes"] == {"person": 27, "sports ball": 3} and tracks[0]["length"] == 30
    assert tracks[1]["length"] == 30 - sum(1 for d in _scene() if len(d) == 1)
    # while A is a sports ball (frames 3-5) its track is drawn as a person: the majority so far
    assert settled[4].track_classes.tolist()[0] == 0
    assert len(settled[12].trails[1]) == 4  # trail_frames


def test_the_first_frame_of_each_track_is_named_after_the_detection_that_started_it():
    """Identical boxes: a low-scored duplicate of a started track's box and two objects on one
    box; each track's first id goes to the detection that started it, not to one of the same box."""
    frame = [
        (10, 10, 40, 80, 0.4, 1),
        (10, 10, 40, 80, 0.9, 0),
        (200, 10, 230, 80, 0.9, 0),
        (200, 10, 230, 80, 0.8, 0),
    ]
    settled, video = _track([frame, frame, frame])
    first = settled[0]
    assert first.instances.scores.tolist() == pytest.approx([0.9, 0.9, 0.8])  # the 0.4 one joined nothing
    assert sorted(first.track_ids.tolist()) == [1, 2, 3]
    assert all(track["classes"] == {"person": 3} for track in video.tracks(NAMES))


def test_an_object_hidden_longer_than_the_buffer_comes_back_under_a_new_id():
    frames = [[(20 + 4 * i, 30, 44 + 4 * i, 90, 0.9, 0)] if not 5 <= i < 25 else [] for i in range(30)]
    settled, _ = _track(frames, lost_track_buffer=15)  # 15 frames at 30 fps: 5 frames at 10 fps
    ids = {frame.track_ids.tolist()[0] for frame in settled if len(frame.instances)}
    assert ids == {1, 2}
    settled, _ = _track(frames, lost_track_buffer=90)  # 30 frames at 10 fps: the track waits
    assert {frame.track_ids.tolist()[0] for frame in settled if len(frame.instances)} == {1}


def test_tracker_parameters_that_contradict_each_other_are_refused():
    with pytest.raises(D2RetrainError, match=r"low_score_threshold 0\.6 is above high_score_threshold 0\.5"):
        tracker_options(filled("inference", {"tracker": {"low_score_threshold": 0.6}})["tracker"])


def _ground_truth(tmp_path):
    """Two objects over 20 frames in MOT ground-truth form, and perfect tracks of them."""
    truth, tracks = [], []
    for frame in range(1, 21):
        for object_id, x in ((1, 10 + 5 * frame), (2, 200 - 5 * frame)):
            truth.append(f"{frame},{object_id},{x},20,30,60,1,1,1.0")
            tracks.append(f"{frame},{object_id + 6},{x},20,30,60,0.9,-1,-1,-1")
    (tmp_path / "gt.txt").write_text("\n".join(truth) + "\n")
    return tmp_path / "gt.txt", tracks


def test_perfect_tracks_score_one_and_known_errors_score_what_they_should(tmp_path):
    truth, tracks = _ground_truth(tmp_path)
    (tmp_path / "perfect.csv").write_text("\n".join(tracks) + "\n")
    perfect = score_tracks(truth, tmp_path / "perfect.csv")
    assert perfect["HOTA"] == perfect["MOTA"] == perfect["IDF1"] == 1.0
    assert (perfect["IDSW"], perfect["FP"], perfect["FN"], perfect["tracks"], perfect["frames"]) == (
        0,
        0,
        0,
        2,
        20,
    )
    # every 10th row missing: 4 misses of 40 boxes; a new id for object 1 from frame 11: one switch
    damaged = [row for number, row in enumerate(tracks) if number % 10 != 3]
    damaged = [row.replace(",7,", ",9,", 1) if int(row.split(",")[0]) > 10 else row for row in damaged]
    (tmp_path / "damaged.csv").write_text("\n".join(damaged) + "\n")
    scores = score_tracks(truth, tmp_path / "damaged.csv")
    assert (scores["FN"], scores["FP"], scores["IDSW"], scores["tracks"]) == (4, 0, 1, 3)
    assert scores["MOTA"] == pytest.approx(1 - (4 + 1) / 40, abs=1e-4)
    assert scores["IDF1"] < 1.0


def test_tracks_of_a_video_where_nothing_was_tracked_score_as_all_missed(tmp_path):
    truth, _ = _ground_truth(tmp_path)
    (tmp_path / "none.csv").write_text("")
    scores = score_tracks(truth, tmp_path / "none.csv")
    assert (scores["FN"], scores["FP"], scores["tracks"], scores["MOTA"], scores["IDF1"]) == (
        40,
        0,
        0,
        0.0,
        0.0,
    )


def test_track_eval_command_prints_and_writes_the_scores(tmp_path, capsys):
    truth, tracks = _ground_truth(tmp_path)
    (tmp_path / "run.tracks.csv").write_text("\n".join(tracks) + "\n")
    (tmp_path / "run.tracks.json").write_text(json.dumps({"frames": 20, "tracks": []}))
    output = tmp_path / "scores.json"
    assert (
        main(
            ["track-eval", "--gt", str(truth), "--pred", str(tmp_path / "run.tracks.csv"), "-o", str(output)]
        )
        == 0
    )
    assert json.loads(output.read_text())["IDF1"] == 1.0
    assert "IDF1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("truth", "tracks", "described", "message"),
    [
        (
            "1,1,10,20,30,60,1,1,1\n1,2,a,b\n",
            "1,1,10,20,30,60,0.9,-1,-1,-1\n",
            None,
            "gt.txt:2: not a MOTChallenge row",
        ),
        (
            "1,1,10,20,30,60,1,1,1\n",
            "1,1,10,20,30\n",
            None,
            "tracks.csv:1: 5 columns, a MOTChallenge row has at least 6",
        ),
        ("0,1,10,20,30,60,1,1,1\n", "1,1,10,20,30,60,0.9\n", None, "gt.txt:1: frame below 1"),
        ("1,1,10,20,30,-6,1,1,1\n", "1,1,10,20,30,60,0.9\n", None, "negative width or height"),
        ("", "1,1,10,20,30,60,0.9\n", None, "gt.txt: no rows"),
        (
            "1,1,10,20,30,60,1,1,1\n",
            "1,1,10,nan,30,60,0.9\n",
            None,
            "tracks.csv:1: a value that is not a finite number",
        ),
        (
            "1,1,10,20,30,60,1,1,1\n",
            "1,3,10,20,30,60,0.9\n1,3,50,20,30,60,0.9\n",
            None,
            "tracks.csv:2: frame 1 has id 3 twice (line 1 too)",
        ),
        (
            "1,1,10,20,30,60,1,1,1\n",
            "1,1,10,20,30,60,0.9\n5,1,10,20,30,60,0.9\n",
            None,
            "tracks up to frame 5, but the video has 1 frames",
        ),
        (
            "1,1,10,20,30,60,1,1,1\n40,1,10,20,30,60,1,1,1\n",
            "1,1,10,20,30,60,0.9\n",
            60,
            "ground truth ends at frame 40, but",
        ),
        (
            "1,1,10,20,30,60,1,1,1\n70,1,10,20,30,60,1,1,1\n",
            "1,1,10,20,30,60,0.9\n",
            60,
            "ground truth up to frame 70, but the video has 60",
        ),
    ],
)
def test_track_eval_refuses_bad_files_in_one_line_with_exit_2_and_writes_nothing(
    tmp_path, capsys, truth, tracks, described, message
):
    (tmp_path / "gt.txt").write_text(truth)
    (tmp_path / "run.tracks.csv").write_text(tracks)
    if described is not None:
        (tmp_path / "run.tracks.json").write_text(json.dumps({"frames": described}))
    output = tmp_path / "scores.json"
    arguments = ["track-eval", "--gt", str(tmp_path / "gt.txt"), "--pred", str(tmp_path / "run.tracks.csv")]
    assert main([*arguments, "-o", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error and error.startswith("d2retrain track-eval: error:")
    assert not output.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--tracker", "minimum_iou=1.5"], "inference.tracker.minimum_iou is 1.5; expected <= 1"),
        (["--tracker", "lost_track_buffer=-1"], "inference.tracker.lost_track_buffer is -1; expected >= 0"),
        (["--tracker", "minimum_ious=0.2"], "inference.tracker.minimum_ious is not a key; did you mean"),
        (["--tracker", "minimum_iou"], "--tracker: 'minimum_iou' is not KEY=VALUE"),
        (["--tracker", "low_score_threshold=0.9"], "low_score_threshold 0.9 is above high_score_threshold"),
        (["--trail-frames", "-2"], "inference.trail_frames is -2; expected >= 0"),
    ],
)
def test_infer_refuses_tracker_parameters_out_of_range_before_loading_anything(
    tmp_path, capsys, arguments, message
):
    output = tmp_path / "out"
    command = [
        "infer",
        "--model",
        str(tmp_path / "no-model"),
        "-v",
        str(tmp_path),
        "-o",
        str(output),
        "--track",
    ]
    assert main([*command, *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not output.exists()


def test_infer_refuses_tracker_settings_without_track(tmp_path, capsys):
    command = ["infer", "--model", str(tmp_path), "-v", str(tmp_path), "-o", str(tmp_path / "out")]
    assert main([*command, "--tracker", "minimum_iou=0.2"]) == 2
    assert "--tracker and --trail-frames set how videos are tracked: add --track" in capsys.readouterr().err


def test_a_folder_of_frames_reads_its_rate_from_seqinfo_and_refuses_what_is_not_a_video(tmp_path):
    import cv2

    from d2retrain.core.errors import InputFileError
    from d2retrain.infer.videoio import probe, read_frames

    frames = tmp_path / "seq" / "img1"
    frames.mkdir(parents=True)
    for index, size in enumerate([(40, 30), (40, 30), (30, 40)], start=1):
        cv2.imwrite(str(frames / f"{index:06d}.png"), np.full((size[1], size[0], 3), 9 * index, np.uint8))
    assert probe(frames, 25).rate == 25 and (probe(frames).width, probe(frames).frames) == (40, 3)
    (tmp_path / "seq" / "seqinfo.ini").write_text("[Sequence]\nframeRate=30\n")
    assert probe(frames, 25).rate == 30
    with pytest.raises(InputFileError, match=r"000003\.png: 30x40, but the first frame is 40x30"):
        list(read_frames(frames))
    (tmp_path / "seq" / "seqinfo.ini").write_text("[Sequence]\nframeRate=0\n")
    with pytest.raises(InputFileError, match=r"frameRate 0\.0 is not a frame rate"):
        probe(frames)
