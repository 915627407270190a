"""The engines' training halves behind one contract, and their registry.

The model half of each engine is registered in :data:`d2retrain.model.engines.MODEL_ENGINES`; a new
engine adds a module here (its ``train``) and one line to :data:`TRAIN_ENGINES`.
"""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from d2retrain.train.job import TrainJob

logger = logging.getLogger(__name__)

__all__ = ["TRAIN_ENGINES", "TrainEngine", "train_engine"]


class TrainEngine(Protocol):
    """What an engine's training module provides (:mod:`d2retrain.train.tv`, :mod:`d2retrain.train.d2`)."""

    def train(self, job: TrainJob, fingerprint: str) -> Path:
        """Train (or resume a killed run of the same fingerprint); return the final checkpoint.

        Rank 0 writes checkpoints (``model``: the network's state dict) under ``job.checkpoint_dir``,
        ``metrics.jsonl`` (one line per iteration, AP records at evaluations) and nothing else.
        """
        ...


def _torchvision() -> TrainEngine:
    from d2retrain.train import tv

    return tv


def _detectron2() -> TrainEngine:
    from d2retrain.train import d2

    return d2


# Engine name -> its training half, imported when first asked for (detectron2 is optional).
TRAIN_ENGINES: dict[str, Callable[[], TrainEngine]] = {"detectron2": _detectron2, "torchvision": _torchvision}


def train_engine(name: str) -> TrainEngine:
    """The training half of a resolved engine (see :func:`d2retrain.model.engines.resolve_engine`)."""
    return TRAIN_ENGINES[name]()
