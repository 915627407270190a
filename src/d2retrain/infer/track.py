"""Tracks across a video's frames: ByteTrack (Roboflow's ``trackers``) links each frame's instances,
and each track gets a stable id, one class (the majority of its detections'), a colour and a trail.

The tracker sees the boxes and scores only (no appearance model, nothing downloaded): an object
that leaves the picture, or stays hidden longer than ``lost_track_buffer``, comes back under a new
id. Detections scored at least ``score_threshold`` are written whether a track takes them or not;
those between ``low_score_threshold`` and it are written only when they join an existing track
(ByteTrack's second association: occluded or blurred objects keep their track).

ByteTrack names a track from its second consecutive detection on; its first detection is given
the same id here, one frame later (frames leave :class:`VideoTracker` one frame behind the
model). With ``minimum_consecutive_frames`` above 2, the detections between the first and the
one that confirms the track keep no id.
"""

import collections
import colorsys
import dataclasses
import logging
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np

from d2retrain.core.errors import D2RetrainError
from d2retrain.model.instances import Instances

logger = logging.getLogger(__name__)

__all__ = [
    "TrackedFrame",
    "TrackerOptions",
    "VideoTracker",
    "require_tracker",
    "track_color",
    "tracker_options",
]


@dataclasses.dataclass(frozen=True)
class TrackerOptions:
    """ByteTrack's parameters; defaults live in the config schema's ``inference.tracker`` section.

    Attributes:
        lost_track_buffer: How long a track that finds no detection is kept, in frames at 30 fps
            (scaled to the video's rate: 30 is one second).
        track_activation_threshold: Lowest score that starts a track.
        high_score_threshold: Detections scored at least this are matched first (ByteTrack's
            high-confidence stage); the others only to the tracks left unmatched.
        low_score_threshold: Lowest score the model reports to the tracker (below
            ``inference.score_threshold``, such a detection is written only if it joins a track).
        minimum_iou: Least IoU between a track's predicted box and a detection to match them.
        minimum_consecutive_frames: Detections in a row before a track is confirmed (given an id).
    """

    lost_track_buffer: int
    track_activation_threshold: float
    high_score_threshold: float
    low_score_threshold: float
    minimum_iou: float
    minimum_consecutive_frames: int


def tracker_options(section: dict[str, Any]) -> TrackerOptions:
    """:class:`TrackerOptions` from the config's ``inference.tracker`` section (checked against the
    schema, its defaults filled).

    Raises:
        D2RetrainError: ``low_score_threshold`` above ``high_score_threshold``.
    """
    options = TrackerOptions(
        **{field.name: section[field.name] for field in dataclasses.fields(TrackerOptions)}
    )
    if options.low_score_threshold > options.high_score_threshold:
        raise D2RetrainError(
            f"inference.tracker: low_score_threshold {options.low_score_threshold} is above "
            f"high_score_threshold {options.high_score_threshold}"
        )
    return options


def require_tracker() -> None:
    """Check that the tracker library is installed.

    Raises:
        D2RetrainError: It is not, with how to install it.
    """
    try:
        import trackers  # noqa: F401
    except ImportError as error:
        raise D2RetrainError(
            f"inference.track needs the trackers library ({error}): install d2retrain's `track` "
            "extra (tools/setup.sh does; pip: see docs/tracking.md#install)"
        ) from None


def track_color(track_id: int) -> tuple[int, int, int]:
    """A BGR colour of its own for each track id, the same in every frame and run (hues spread by
    the golden ratio, so neighbouring ids differ)."""
    hue = (track_id * 0.618033988749895) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(blue * 255), round(green * 255), round(red * 255)


@dataclasses.dataclass
class TrackedFrame:
    """A frame's instances as written: those kept, with their track ids (``-1``: none).

    Attributes:
        index: The frame's number (0-based, as in the JSONL).
        image: The decoded frame (BGR).
        instances: The instances written: scored at least the score threshold, or in a track.
        track_ids: One per instance: its track's id (from 1), or -1.
        track_classes: One per instance: its track's class so far (the majority of the track's
            detections up to this frame), or its own class when it has no track.
        trails: Per track id in this frame, the centres of its boxes over the last frames.
    """

    index: int
    image: np.ndarray
    instances: Instances
    track_ids: np.ndarray
    track_classes: np.ndarray
    trails: dict[int, list[tuple[float, float]]]


@dataclasses.dataclass
class _Track:
    classes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first: int = -1
    last: int = -1
    length: int = 0
    scores: float = 0.0

    def majority(self) -> int:
        # the most frequent class; a tie goes to the lower class index (stable across runs)
        return min(self.classes.items(), key=lambda item: (-item[1], item[0]))[0]


@dataclasses.dataclass
class _Pending:
    index: int
    image: np.ndarray
    instances: Instances
    ids: np.ndarray


class VideoTracker:
    """Links one video's frames into tracks, frame after frame (memory flat in the frames).

    :meth:`push` takes each frame's instances (all those the model scored at least
    ``low_score_threshold``) and returns the frames whose tracks are settled, one frame behind;
    :meth:`finish` returns the last. :meth:`tracks` describes every track once the video is done.
    """

    def __init__(
        self, options: TrackerOptions, rate: Fraction | float, score_threshold: float, trail_frames: int = 0
    ) -> None:
        """Args:
        options: ByteTrack's parameters.
        rate: The video's frames per second.
        score_threshold: Detections scored at least this are written even without a track.
        trail_frames: Box centres kept per track for drawing its trail (0: none).
        """
        require_tracker()
        from trackers import ByteTrackTracker

        self.options = options
        self.score_threshold = score_threshold
        self._tracker = ByteTrackTracker(
            lost_track_buffer=options.lost_track_buffer,
            frame_rate=float(rate),
            track_activation_threshold=options.track_activation_threshold,
            minimum_consecutive_frames=options.minimum_consecutive_frames,
            minimum_iou_threshold=options.minimum_iou,
            high_conf_det_threshold=options.high_score_threshold,
        )
        self._pending: _Pending | None = None
        self._spawned: list[tuple[Any, int]] = []  # (tracklet, detection index) of the pending frame
        self._tracks: dict[int, _Track] = {}
        self._trail_frames = trail_frames
        self._trails: dict[int, collections.deque] = {}

    def push(self, index: int, image: np.ndarray, instances: Instances) -> Iterator[TrackedFrame]:
        """Link one frame's instances; yield the frame before it, its tracks now settled."""
        import supervision as sv

        detections = sv.Detections(
            xyxy=np.asarray(instances.boxes, np.float64).reshape(-1, 4),
            confidence=np.asarray(instances.scores, np.float64),
            class_id=np.asarray(instances.classes, int),
            data={"index": np.arange(len(instances))},
        )
        before = list(self._tracker.tracks)  # held, so that no new tracklet reuses an id() of these
        known = {id(tracklet) for tracklet in before}
        result = self._tracker.update(detections)
        ids = np.full(len(instances), -1, np.int64)
        if len(result):
            matched = np.asarray(result.tracker_id)
            ids[np.asarray(result.data["index"])] = np.where(matched >= 0, matched + 1, -1)
        # the first detection of a track confirmed now takes its id (ByteTrack names it one frame late)
        if self._pending is not None:
            for tracklet, detection in self._spawned:
                if tracklet.tracker_id >= 0 and self._pending.ids[detection] < 0:
                    self._pending.ids[detection] = tracklet.tracker_id + 1
            yield self._settle(self._pending)
        self._spawned = self._spawns(
            [tracklet for tracklet in self._tracker.tracks if id(tracklet) not in known], result
        )
        del before
        self._pending = _Pending(index, image, instances, ids)

    def finish(self) -> Iterator[TrackedFrame]:
        """Yield the last frame pushed."""
        if self._pending is not None:
            yield self._settle(self._pending)
            self._pending = None

    def _spawns(self, new_tracklets: list, result: Any) -> list[tuple[Any, int]]:
        """Which detection started each new tracklet. ByteTrack lists the detections no track took
        last, in order, and starts a tracklet for each that reaches both the high-score and the
        activation threshold: the last of those, in order, are the new tracklets' (each starts
        at its detection's box, checked)."""
        if not new_tracklets:
            return []
        floor = max(self.options.high_score_threshold, self.options.track_activation_threshold)
        untracked = (np.asarray(result.tracker_id) < 0) & (np.asarray(result.confidence) >= floor)
        starters = np.asarray(result.data["index"])[untracked][-len(new_tracklets) :]
        boxes = np.asarray(result.xyxy, np.float64)[untracked][-len(new_tracklets) :]
        spawned = []
        pairs = zip(reversed(new_tracklets), reversed(starters.tolist()), boxes[::-1], strict=False)
        for tracklet, detection, box in pairs:
            if np.allclose(np.asarray(tracklet.get_state_bbox(), np.float64), box, atol=1e-3):
                spawned.append((tracklet, int(detection)))
        return spawned

    def _settle(self, pending: _Pending) -> TrackedFrame:
        instances, ids = pending.instances, pending.ids
        keep = (np.asarray(instances.scores) >= self.score_threshold) | (ids >= 0)
        kept = instances.take(keep)
        ids = ids[keep]
        classes = np.asarray(kept.classes, np.int64).copy()
        for number, (track_id, label, box, score) in enumerate(
            zip(ids.tolist(), kept.classes.tolist(), kept.boxes, kept.scores.tolist(), strict=True)
        ):
            if track_id < 0:
                continue
            track = self._tracks.setdefault(track_id, _Track(first=pending.index))
            track.classes[int(label)] += 1
            track.last, track.length, track.scores = pending.index, track.length + 1, track.scores + score
            classes[number] = track.majority()
            if self._trail_frames:
                trail = self._trails.setdefault(track_id, collections.deque(maxlen=self._trail_frames))
                trail.append((float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2))
        trails = {int(t): list(self._trails[t]) for t in ids.tolist() if t >= 0 and t in self._trails}
        return TrackedFrame(pending.index, pending.image, kept, ids, classes, trails)

    def tracks(self, names: tuple[str, ...]) -> list[dict[str, Any]]:
        """Every track: id, class (the majority of its detections'), detections per class, length
        (frames with a detection), first and last frame (0-based), mean score."""
        return [
            {
                "id": track_id,
                "class": names[track.majority()],
                "classes": {names[label]: count for label, count in sorted(track.classes.items())},
                "length": track.length,
                "first_frame": track.first,
                "last_frame": track.last,
                "mean_score": round(track.scores / track.length, 4),
            }
            for track_id, track in sorted(self._tracks.items())
        ]
