"""A shard job of the workflow: infer its files, then write its status file, the job's declared output."""

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from d2retrain.core.errors import D2RetrainError
from d2retrain.core.fileio import write_text_atomic
from d2retrain.infer.inputs import InputFile
from d2retrain.infer.options import InferenceOptions
from d2retrain.infer.pipeline import run_inference
from d2retrain.infer.summary import FileStatus
from d2retrain.workflow.planning import first_missing_output

logger = logging.getLogger(__name__)

__all__ = ["infer_shard"]


def infer_shard(
    model_dir: str,
    images: Sequence[str],
    videos: Sequence[str],
    status_path: str,
    options: InferenceOptions,
    classes: Sequence[str],
    threads: int = 1,
) -> list[FileStatus]:
    """Infer a shard's files into the inference folder above ``status_path``, keeping the outputs
    of files made from the same content, model and options, then write the status file.

    The status file lists every file's status (the run summary reads it). It is written last, and
    only when every file's outputs are there: the workflow declares it, not the files' outputs.

    Args:
        model_dir: The subset's model folder (or an export folder).
        images: The shard's images.
        videos: The shard's videos.
        status_path: ``<inference folder>/status/shard_NN.json``.
        options: The inference options.
        classes: The subset's classes (a model trained for others is refused).
        threads: CPU threads.

    Raises:
        D2RetrainError: A file's outputs are missing after the run, or what :func:`run_inference`
            raises.
    """
    inference_folder = Path(status_path).parent.parent
    files = [InputFile.of(path, "image") for path in images] + [
        InputFile.of(path, "video") for path in videos
    ]
    statuses = run_inference(
        model_dir, files, [], inference_folder, options, classes, threads=threads, reuse=True
    )
    missing = first_missing_output(files, inference_folder)
    if missing is not None:
        raise D2RetrainError(f"inference wrote no {inference_folder / missing}; the shard is not complete")
    write_text_atomic(status_path, json.dumps([dataclasses.asdict(s) for s in statuses], indent=1) + "\n")
    return statuses
