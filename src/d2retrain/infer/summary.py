"""Inference run summary: what happened to each input file, merged into one table."""

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from d2retrain.core.fileio import link_or_copy, write_text_atomic
from d2retrain.infer.inputs import InputFile, output_files

logger = logging.getLogger(__name__)

__all__ = ["FileStatus", "gather_drawn", "write_summary"]


@dataclasses.dataclass
class FileStatus:
    """What happened to one input file; the run summary has one row per file.

    Attributes:
        path: The input.
        kind: ``image`` or ``video``.
        name: Its outputs' base name.
        status: ``ok``; ``truncated`` (a video that broke off: the frames before were inferred);
            ``error`` (nothing inferred; the outputs say why).
        error: What was wrong, or empty.
        instances: Instances found (all frames of a video).
        frames: Frames inferred (1 for an image).
        seconds: Wall time spent on the file.
        tracks: A video's tracks per class, with inference.track (``person 4, sports ball 2``).
    """

    path: str
    kind: str
    name: str
    status: str = "ok"
    error: str = ""
    instances: int = 0
    frames: int = 0
    seconds: float = 0.0
    tracks: str = ""


def write_summary(status_paths: Sequence[str | Path], csv_path: str | Path) -> pd.DataFrame:
    """Merge the jobs' status files into one CSV, a row per file, problems first.

    Returns:
        The table.
    """
    rows = [row for path in status_paths for row in json.loads(Path(path).read_text())]
    table = pd.DataFrame(rows, columns=[field.name for field in dataclasses.fields(FileStatus)])
    table = table.sort_values(
        ["status", "kind", "name"],
        key=lambda c: c.ne("ok") if c.name == "status" else c,
        ascending=[False, True, True],
    )
    write_text_atomic(csv_path, table.to_csv(index=False))
    for row in table.itertuples():
        if row.status != "ok":
            logger.warning("%s %s: %s", row.kind, row.status, row.error)
    logger.info("%d files inferred, %d with problems", len(table), int((table.status != "ok").sum()))
    return table


def gather_drawn(table: pd.DataFrame, inference_dir: str | Path, gallery_dir: str | Path) -> int:
    """Hard-link (else copy) the drawn file of every row of the run summary (see
    :func:`write_summary`) into one folder, as ``<kind>/<name>.<png|mp4>``: the report shows that
    folder, because the inference jobs declare their status files only (per-file outputs would make
    Snakemake's planning quadratic).

    Returns:
        Files gathered.
    """
    columns = (table[column].tolist() for column in ("path", "kind", "name"))
    for path, kind, name in zip(*columns, strict=True):
        drawn = output_files(InputFile(str(path), str(kind), str(name)))[0]
        link_or_copy(Path(inference_dir, drawn), Path(gallery_dir, str(kind), Path(drawn).name))
    logger.info("%d drawn files gathered in %s for the report", len(table), gallery_dir)
    return len(table)
