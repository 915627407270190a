"""Work split in two halves, one in a forked child process."""

import os
import threading

import pytest
from helpers import TWO_CPUS

from d2retrain.core.errors import AnnotationError
from d2retrain.core.forked import in_two_halves

pytestmark = [
    pytest.mark.skipif(not TWO_CPUS, reason="needs fork and two CPUs"),
    pytest.mark.usefixtures("one_thread"),
]


def pid_and_items(part) -> tuple[int, list]:
    return os.getpid(), list(part)


def test_the_first_half_runs_in_a_child_process_and_the_parts_come_back_in_order():
    (child, first), (parent, second) = in_two_halves(pid_and_items, list(range(11)), processes=2, minimum=1)
    assert (first, second) == (list(range(5)), list(range(5, 11)))
    assert parent == os.getpid() and child != os.getpid()


def test_an_error_raised_in_the_child_half_is_raised_again_here():
    def fail_on_zero(part):
        if 0 in part:
            raise AnnotationError("annotations[0]: zero")
        return len(part)

    with pytest.raises(AnnotationError, match=r"annotations\[0\]: zero"):
        in_two_halves(fail_on_zero, list(range(10)), processes=2, minimum=1)


def test_a_child_that_dies_is_an_error_not_a_missing_half():
    def die_in_the_child(part):
        if 0 in part:
            os._exit(3)
        return part

    with pytest.raises(RuntimeError, match="died"):
        in_two_halves(die_in_the_child, list(range(10)), processes=2, minimum=1)


def test_one_process_does_it_all_when_asked_for_few_items_or_while_other_threads_run():
    items = list(range(10))
    whole = [(os.getpid(), items)]
    assert in_two_halves(pid_and_items, items, processes=1, minimum=1) == whole
    assert in_two_halves(pid_and_items, items, processes=2, minimum=11) == whole
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert in_two_halves(pid_and_items, items, processes=2, minimum=1) == whole
    finally:
        release.set()
        thread.join()
