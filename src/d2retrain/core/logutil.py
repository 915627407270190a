"""Logging set up once per entry point: to stderr and, for workflow jobs, to the rule's log file."""

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from d2retrain.core.errors import D2RetrainError

logger = logging.getLogger(__name__)

__all__ = ["configure_logging", "run_job"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(log_file: str | None = None, level: int = logging.INFO, tag: str = "") -> None:
    """Send log records to stderr and, when given, to ``log_file`` (appended).

    Args:
        log_file: A file that receives the same records, e.g. a Snakemake rule's ``log``.
        level: The lowest level shown.
        tag: Shown in every record, e.g. the rank of a training process.
    """
    layout = _FORMAT.replace("%(name)s", f"[{tag}] %(name)s") if tag else _FORMAT
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(level=level, format=layout, handlers=handlers, force=True)
    logging.captureWarnings(True)


def run_job(log_file: str | None, function: Callable[..., object], *args: object, **kwargs: object) -> None:
    """Entry point of a workflow job: configure logging, run ``function``, map user errors.

    A :class:`D2RetrainError` is logged as one line and ends the process with status 2,
    so the job log says what to fix instead of showing a traceback.

    Args:
        log_file: The rule's log file.
        function: The package function the job runs.
        *args: Its positional arguments.
        **kwargs: Its keyword arguments.
    """
    configure_logging(log_file)
    try:
        function(*args, **kwargs)
    except D2RetrainError as error:
        logger.error("%s", error)
        sys.exit(2)
