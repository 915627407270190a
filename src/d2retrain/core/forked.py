"""Work on a large list split in two halves run at once, one in a forked child process."""

import logging
import os
import pickle
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["in_two_halves"]

Items = TypeVar("Items", Sequence[Any], np.ndarray)  # anything sliced into halves
R = TypeVar("R")


def in_two_halves(
    function: Callable[[Items], R], items: Items, processes: int, minimum: int = 50_000
) -> list[R]:
    """``[function(first half), function(second half)]``, the first computed in a forked child
    while this process computes the second, when ``processes`` allows two.

    The child inherits ``items`` without copying (fork), so this pays off where the work per
    item is pure CPU and the results are small next to it: decoding the keys of 600k COCO
    annotations, or checking their geometry, in about 0.55x the time on 2 cores. It runs
    ``[function(items)]`` here instead when ``processes`` is 1, when ``items`` holds fewer
    than ``minimum``, when the machine gives this process one CPU, where ``fork`` is missing,
    or when other threads are running (a fork taken while another thread holds a lock can
    deadlock the child).

    Args:
        function: Computes a picklable result from a slice of ``items``; an exception it raises
            in the child is raised again here.
        items: The work.
        processes: How many processes the caller may use (a job's threads).
        minimum: Fewer items than this are not worth a process.

    Returns:
        One result per part, in order.
    """
    if processes < 2 or len(items) < minimum or not _can_fork():
        return [function(items)]
    half = len(items) // 2
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's coverage is not collected
        _run_child(function, items[:half], read, write)
    os.close(write)
    try:
        second = function(items[half:])
    finally:
        with os.fdopen(read, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not payload:
        name = getattr(function, "__qualname__", repr(function))
        raise RuntimeError(f"the forked half of {name} died (wait status {status})")
    failed, first = pickle.loads(payload)
    if failed:
        raise first
    return [first, second]


def _can_fork() -> bool:
    if not hasattr(os, "fork") or threading.active_count() > 1:
        return False
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return len(cpus) > 1


def _run_child(function: Callable[[Items], Any], part: Items, read: int, write: int) -> None:
    """Compute, send ``(failed, result or exception)`` to the parent, and leave at once."""
    code = 0
    try:
        os.close(read)
        try:
            message = (False, function(part))
        except Exception as error:  # handed to the parent
            message = (True, error)
        with os.fdopen(write, "wb") as pipe:
            pickle.dump(message, pipe, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:
        code = 1
    finally:
        os._exit(code)  # no atexit handlers, no buffers of the parent flushed twice
