"""Tracks scored against ground truth: HOTA, MOTA, IDF1 and ID switches, computed by the trackers
library's port of TrackEval (``trackers.eval``, which its authors check against TrackEval).

Both files are in MOTChallenge form (``frame, id, x, y, w, h, score, ...``, frames from 1). The score
is class-agnostic: every ground-truth object counts, whatever its class (the 8th column), and every
track; how well classes are told apart is the detector's AP. TrackEval's MOTChallenge reading keeps
only class 1 (pedestrians) and drops distractor classes, so both files reach it with class 1.
"""

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from d2retrain.core.errors import D2RetrainError
from d2retrain.core.fileio import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "read_mot", "score_tracks", "write_tracking_table"]

# What score_tracks returns, in order: (key, what it is)
METRICS = (
    ("HOTA", "higher order tracking accuracy: detection and association, over IoU 0.05..0.95"),
    ("DetA", "HOTA's detection accuracy"),
    ("AssA", "HOTA's association accuracy"),
    ("MOTA", "1 - (misses + false positives + ID switches) / ground-truth boxes, at IoU 0.5"),
    ("MOTP", "mean IoU of the matched boxes"),
    ("IDF1", "F1 of the boxes given to the right identity (one track per object, the best match)"),
    ("IDSW", "ID switches: a ground-truth object matched to another track than before"),
    ("FP", "false positive boxes"),
    ("FN", "missed ground-truth boxes"),
    ("gt_tracks", "ground-truth objects"),
    ("tracks", "tracks found"),
)


def read_mot(path: str | Path, columns: int = 6, empty: bool = False) -> np.ndarray:
    """A MOTChallenge file's rows as floats (``frame, id, x, y, w, h, ...``), checked.

    Args:
        path: The file.
        columns: Fewest columns a row must have.
        empty: Whether a file without rows is fine (tracks of a video where nothing was tracked).

    Raises:
        D2RetrainError: Missing, empty (unless ``empty``), or a row that is not finite numbers, has
            fewer columns, a frame below 1, an id that is not a whole number or a negative width or
            height, or repeats a (frame, id) pair (the first such row, by line number).
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise D2RetrainError(f"{path}: cannot be read ({error})") from None
    rows = []
    seen: dict[tuple[float, float], int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = [float(value) for value in line.replace(" ", "").rstrip(",").split(",")]
        except ValueError:
            raise D2RetrainError(
                f"{path}:{number}: not a MOTChallenge row (numbers, comma-separated): {line[:80]!r}"
            ) from None
        problem = (
            f"{len(row)} columns, a MOTChallenge row has at least {columns}"
            if len(row) < columns
            else "a value that is not a finite number"
            if not all(np.isfinite(row))
            else "frame below 1 or not a whole number"
            if row[0] < 1 or not row[0].is_integer()
            else "id not a whole number"
            if not row[1].is_integer()
            else "negative width or height"
            if row[4] < 0 or row[5] < 0
            else ""
        )
        if not problem and (row[0], row[1]) in seen:
            problem = f"frame {int(row[0])} has id {int(row[1])} twice (line {seen[(row[0], row[1])]} too)"
        if problem:
            raise D2RetrainError(f"{path}:{number}: {problem}: {line[:80]!r}")
        seen[(row[0], row[1])] = number
        rows.append(row[:10] + [-1.0] * (10 - len(row[:10])))
    if not rows and not empty:
        raise D2RetrainError(f"{path}: no rows (an empty MOTChallenge file)")
    return np.asarray(rows, np.float64).reshape(-1, 10)


def score_tracks(ground_truth: str | Path, tracks: str | Path, frames: int | None = None) -> dict[str, Any]:
    """HOTA, MOTA, IDF1, ID switches and the rest of :data:`METRICS` of ``tracks`` against
    ``ground_truth``.

    Args:
        ground_truth: MOT ground truth (``frame, id, x, y, w, h, conf, class, visibility``; rows
            with conf 0 are ignored, as in MOTChallenge).
        tracks: MOT results (``frame, id, x, y, w, h, score, -1, -1, -1``), e.g.
            ``videos/<name>.tracks.csv``.
        frames: The video's frame count; by default the ``frames`` of ``<name>.tracks.json``
            beside ``tracks``, if there is one.

    Returns:
        The metrics by name, and ``frames``.

    Raises:
        D2RetrainError: A malformed file, or files of different lengths: rows beyond the video's
            frames, or ground truth that ends before the tracked video does (when the length comes
            from ``tracks.json``).
    """
    try:
        from trackers.eval import evaluate_mot_sequence
    except ImportError as error:
        raise D2RetrainError(
            f"track-eval needs the trackers library ({error}): install d2retrain's `track` extra"
        ) from None
    truth, found = read_mot(ground_truth), read_mot(tracks, empty=True)
    described = Path(tracks).with_suffix(".json")
    stated = frames
    if stated is None and described.is_file():
        try:
            stated = int(json.loads(described.read_text())["frames"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise D2RetrainError(f"{described}: no frame count ({error})") from None
    length = stated if stated is not None else int(truth[:, 0].max())
    for path, rows, what in ((ground_truth, truth, "ground truth"), (tracks, found, "tracks")):
        if len(rows) and rows[:, 0].max() > length:
            raise D2RetrainError(
                f"{path}: {what} up to frame {int(rows[:, 0].max())}, but the video has {length} frames "
                "(files of different videos or lengths?)"
            )
    if frames is None and stated is not None and truth[:, 0].max() < length:
        raise D2RetrainError(
            f"{ground_truth}: ground truth ends at frame {int(truth[:, 0].max())}, but {described} says the "
            f"video has {length} frames (files of different lengths; give --frames to score anyway)"
        )
    with tempfile.TemporaryDirectory(prefix="d2retrain-track-eval-") as scratch:
        gt_file, tracks_file = Path(scratch, "gt.txt"), Path(scratch, "tracks.txt")
        _write_agnostic(gt_file, truth, keep_conf=True)
        _write_agnostic(tracks_file, found, keep_conf=False)
        result = evaluate_mot_sequence(gt_file, tracks_file, metrics=["CLEAR", "HOTA", "Identity"])
    assert result.CLEAR and result.HOTA and result.Identity
    considered = truth[truth[:, 6] != 0]
    values = {
        "HOTA": result.HOTA.HOTA,
        "DetA": result.HOTA.DetA,
        "AssA": result.HOTA.AssA,
        "MOTA": result.CLEAR.MOTA,
        "MOTP": result.CLEAR.MOTP,
        "IDF1": result.Identity.IDF1,
        "IDSW": int(result.CLEAR.IDSW),
        "FP": int(result.CLEAR.CLR_FP),
        "FN": int(result.CLEAR.CLR_FN),
        "gt_tracks": len(np.unique(considered[:, 1])),
        "tracks": len(np.unique(found[:, 1])),
    }
    return {
        name: round(value, 4) if isinstance(value, float) else value for name, value in values.items()
    } | {"frames": length}


def write_tracking_table(
    ground_truth: dict[str, str], videos_dir: str | Path, csv_path: str | Path
) -> pd.DataFrame:
    """Score each video's tracks (``<videos_dir>/<name>.tracks.csv``) against its ground truth and
    write one row per video.

    Args:
        ground_truth: Video name -> MOT ground-truth file.
        videos_dir: The inference folder's ``videos/``.
        csv_path: The table to write.

    Returns:
        The table.

    Raises:
        D2RetrainError: A video without tracks (not inferred, or inferred without tracking), or a
            file :func:`score_tracks` refuses.
    """
    rows = []
    for name, truth in sorted(ground_truth.items()):
        tracks = Path(videos_dir, f"{name}.tracks.csv")
        if not tracks.is_file():
            raise D2RetrainError(
                f"{tracks}: no tracks for video {name} (was it inferred with inference.track?)"
            )
        scores = score_tracks(truth, tracks)
        logger.info(
            "%s: HOTA %.3f, MOTA %.3f, IDF1 %.3f, %d ID switches",
            name,
            *(scores[k] for k in ("HOTA", "MOTA", "IDF1", "IDSW")),
        )
        rows.append({"video": name, **scores, "ground_truth": str(truth)})
    table = pd.DataFrame(rows)
    write_text_atomic(csv_path, table.to_csv(index=False))
    return table


def _write_agnostic(path: Path, rows: np.ndarray, keep_conf: bool) -> None:
    """Rows with class 1 (what MOTChallenge's reading scores) and, for tracks, conf 1. No tracks:
    one row of id -1, which the evaluation leaves out (it reads no empty file)."""
    if not len(rows):
        rows = np.array([[1, -1, 0, 0, 1, 1, 1, 1, -1, -1]], np.float64)
    rows = rows.copy()
    if not keep_conf:
        rows[:, 6] = 1
    rows[:, 7] = 1
    rows[:, 8] = np.where(rows[:, 8] < 0, 1, rows[:, 8])
    np.savetxt(
        path, rows, delimiter=",", fmt=["%d", "%d", "%.3f", "%.3f", "%.3f", "%.3f", "%g", "%d", "%g", "%g"]
    )
