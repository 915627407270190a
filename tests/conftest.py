"""Fixtures shared by the tests, and the collection hooks (detectron2 skips, xdist groups, order).
Paths, factories and other helpers are in :mod:`helpers` (``tests/helpers``)."""

import os
import threading
from pathlib import Path

# OpenMP threads that wait by sleeping, not spinning (before torch is imported here or in a
# subprocess): two test workers share two cores, and PyTorch's spinning threads beside another busy
# process made a 2-thread training 2.8x slower (10.2 s against 3.6 s for 10 ResNet-18 steps on this
# machine, benchmarks/README.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
from helpers import detectron2_importable, make_coco, write_json


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``detectron2`` skip, with the reason, where it is not importable.

    With pytest-xdist (``tools/test.sh`` runs ``-n auto --dist loadgroup``): the tests of a
    module that share a module-scoped fixture (a finished workflow run, a cluster, a trained model)
    run in one worker, so that the fixture is built once, not once per worker; so do all the tests
    reading the session's main job (:func:`main_run`), whatever their module."""
    for item in items:
        if "detectron2" in item.keywords and not detectron2_importable():
            item.add_marker(pytest.mark.skip(reason="detectron2 is not importable in this environment"))
        definitions = getattr(item, "_fixtureinfo", None)
        if definitions is None:
            continue
        if "main_run" in item.fixturenames:  # one worker builds the shared main job, and reads it
            item.add_marker(pytest.mark.xdist_group("main_run"))
            continue
        if any(
            chain[-1].scope == "module"
            for name, chain in definitions.name2fixturedefs.items()
            if name in item.fixturenames and chain
        ):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    # the longest first, so that no worker starts one of them while the other is nearly done
    items.sort(
        key=lambda item: next((i for i, name in enumerate(LONGEST) if name in item.nodeid), len(LONGEST))
    )


# The longest tests and modules (`--durations`), in the order they should start.
LONGEST = (
    "test_the_default_main_job",  # builds main_run
    "test_slurm.py",
    "test_codehash.py",
    "test_export.py",
    "test_adding_an_image_reruns",
)


@pytest.fixture
def one_thread():
    """This process with no thread but the main one, so that ``d2retrain.core.forked`` may fork:
    tqdm's monitor thread, started by an earlier progress bar, is stopped."""
    from tqdm import tqdm

    if tqdm.monitor is not None:
        tqdm.monitor.exit()
        tqdm.monitor = None
    assert threading.active_count() == 1, f"threads left running by earlier tests: {threading.enumerate()}"


@pytest.fixture
def forks(one_thread, monkeypatch) -> list[int]:
    """The child processes forked during the test (with :func:`one_thread`)."""
    children: list[int] = []
    real_fork = os.fork

    def counted_fork() -> int:
        child = real_fork()
        if child:
            children.append(child)
        return child

    monkeypatch.setattr(os, "fork", counted_fork)
    return children


@pytest.fixture
def coco_file(tmp_path: Path):
    """Write a factory document and return its path."""

    def _write(images: list[list[int]], name: str = "in.json", **kwargs) -> Path:
        return write_json(tmp_path / name, make_coco(images, **kwargs))

    return _write


@pytest.fixture(scope="module")
def mini_split(tmp_path_factory):
    """coco-mini filtered to person + sports ball, val cut short (``helpers.training``)."""
    from helpers.training import write_mini_split

    return write_mini_split(tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="session")
def main_run(tmp_path_factory) -> Path:
    """The embedded default main job, finished, with both exports (``helpers.workflow.main_config``):
    run once for the whole session and read by every test that needs a finished run of it (the
    collection hook keeps them in one worker). A test that changes it works on
    ``helpers.workflow.copy_run`` of it."""
    from helpers.workflow import main_config, snakemake

    workdir = tmp_path_factory.mktemp("main_run")
    snakemake(workdir, main_config(), "--resources", "gpu=1")
    return workdir
