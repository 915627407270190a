"""A trained model folder: the name of every file in it, its records, and the weights it serves.

Training writes the folder; evaluation, export, inference, the prediction grid and the model card
read it. Only this module spells its file names. The served weights have one fixed name,
:attr:`ModelFolder.served` (``model.pth``): a hard link to (or a copy of) the best evaluation's
weights or the final ones, as ``train.keep`` says. The workflow declares that file as the output of
its serve_model rule (after train) and as every consumer's input, so deleting it replans serving.
"""

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from d2retrain.core.config import MOVED_KEYS
from d2retrain.core.errors import D2RetrainError
from d2retrain.core.fileio import link_or_copy, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["ClassInfo", "ModelFolder", "ModelFolderError"]


class ModelFolderError(D2RetrainError):
    """A model folder lacks a file it needs, or was trained for other classes."""


@dataclasses.dataclass(frozen=True)
class ClassInfo:
    """What ``classes.json`` records about a trained model.

    Attributes:
        classes: Class names in model order.
        source_ids: Each class's category id in the dataset it was trained from.
        engine: ``detectron2`` or ``torchvision``.
        architecture: The architecture trained.
        weights: The base weights training started from.
        fingerprint: The training fingerprint (model, solver, classes, training data).
        model_file: Which weights the folder serves (:attr:`ModelFolder.served` is a link to
            them): ``model_best.pth`` or ``model_final.pth``.
    """

    classes: list[str]
    source_ids: list[int]
    engine: str
    architecture: str
    weights: str
    fingerprint: str
    model_file: str = "model_final.pth"


class ModelFolder:
    """One trained model folder (``results/<subset>/model`` in the workflow).

    Args:
        path: The folder; it need not exist yet (training writes it). May hold Snakemake wildcards
            (``results/{subset}/model``) when only its file names are wanted.
    """

    SERVED = "model.pth"
    FINAL = "model_final.pth"
    BEST = "model_best.pth"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"

    @property
    def served(self) -> Path:
        """The weights evaluation, export and inference load (``train.keep``'s choice)."""
        return self.path / self.SERVED

    @property
    def final_weights(self) -> Path:
        """The last iteration's weights."""
        return self.path / self.FINAL

    @property
    def best_weights(self) -> Path:
        """The best evaluation's weights (only when there were evaluations during training)."""
        return self.path / self.BEST

    @property
    def classes_file(self) -> Path:
        """``classes.json``: the class names in model order, their source ids, the engine."""
        return self.path / "classes.json"

    @property
    def config_file(self) -> Path:
        """``config.yaml``: the model and solver specs it was trained with."""
        return self.path / "config.yaml"

    @property
    def best_file(self) -> Path:
        """``best.json``: the best evaluation (iteration, metric, value), iterations done, what is served."""
        return self.path / "best.json"

    @property
    def metrics(self) -> Path:
        """``metrics.jsonl``: one line per logged iteration, AP records at evaluations."""
        return self.path / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        """``loss.png``: the training curves."""
        return self.path / "loss.png"

    @property
    def checkpoints(self) -> Path:
        """Checkpoints and live metrics of a run (kept across reruns, not a workflow output)."""
        return self.path / "checkpoints"

    @property
    def live_metrics(self) -> Path:
        """The run's ``metrics.jsonl`` as it trains (in :attr:`checkpoints`, kept across resumes)."""
        return self.checkpoints / self.metrics.name

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files of the run."""
        return self.path / "tensorboard"

    @property
    def card(self) -> Path:
        """``MODEL_CARD.md``."""
        return self.path / "MODEL_CARD.md"

    @property
    def card_html(self) -> Path:
        """``model_card.html``: the card as the report shows it."""
        return self.path / "model_card.html"

    def read_classes(self, expected: Sequence[str] | None = None) -> ClassInfo:
        """Read ``classes.json``, checking the classes when asked.

        Args:
            expected: Class names the caller needs, in order; None skips the check.

        Raises:
            ModelFolderError: The file is missing or unreadable, or its classes differ.
        """
        path = self.classes_file
        try:
            info = ClassInfo(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise ModelFolderError(
                f"{path}: missing; is {self.path} a folder written by d2retrain train?"
            ) from None
        except (ValueError, TypeError) as error:
            raise ModelFolderError(f"{path}: unreadable ({error})") from None
        if expected is not None and list(expected) != info.classes:
            raise ModelFolderError(
                f"{path}: the model was trained for classes {info.classes}, not {list(expected)}; "
                "retrain it or point to the right model folder"
            )
        return info

    def write_classes(self, info: ClassInfo) -> None:
        """Write ``classes.json`` atomically."""
        write_text_atomic(self.classes_file, json.dumps(dataclasses.asdict(info), indent=2) + "\n")

    def read_config(self) -> dict[str, Any]:
        """``config.yaml`` as written by training: ``model``, ``solver``, ``classes``, the data.
        Test-time input sizes are the model's; a folder written before they moved keeps them
        with the solver, and they are moved on reading."""
        try:
            record = yaml.safe_load(self.config_file.read_text())
        except FileNotFoundError:
            raise ModelFolderError(
                f"{self.config_file}: missing; is {self.path} a folder written by d2retrain train?"
            ) from None
        for old, new in MOVED_KEYS.items():  # the record names the train section "solver"
            (section, key), (new_section, new_key) = old.split("."), new.split(".")
            kept = record.get({"train": "solver"}.get(section, section), {})
            if key in kept:
                record[new_section].setdefault(new_key, kept.pop(key))
        return record

    def read_best(self) -> dict[str, Any]:
        """``best.json`` (empty when there is none)."""
        path = self.best_file
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_best(self, record: dict[str, Any]) -> None:
        """Write ``best.json`` atomically."""
        write_text_atomic(self.best_file, json.dumps(record, indent=2) + "\n")

    def serve(self, weights: Path) -> None:
        """Make :attr:`served` the file ``weights`` (of this folder): a hard link, or a copy."""
        link_or_copy(weights, self.served)
        logger.info("%s serves %s", self.served, weights.name)

    def serve_kept(self) -> Path:
        """Serve the weights training kept (``classes.json``'s ``model_file``: the best evaluation's
        or the final ones, ``train.keep``); returns :attr:`served`.

        Raises:
            ModelFolderError: No ``classes.json``, or the kept file is missing.
        """
        kept = self.path / self.read_classes().model_file
        if not kept.is_file():
            raise ModelFolderError(
                f"{kept}: missing, and classes.json names it as the weights training kept; rerun training"
            )
        self.serve(kept)
        return self.served

    def served_weights(self) -> Path:
        """The weights to load: :attr:`served`, or in a folder written before it existed, the file its
        ``classes.json`` names (``model_file``).

        Raises:
            ModelFolderError: Neither is there (:attr:`served` deleted: :meth:`serve_kept`).
        """
        if self.served.is_file():
            return self.served
        legacy = self.path / self.read_classes().model_file
        if legacy.is_file() and not self._knows_served():
            logger.info(
                "%s: no %s (trained before it existed); loading %s", self.path, self.SERVED, legacy.name
            )
            return legacy
        raise ModelFolderError(
            f"{self.served}: missing; the workflow's next run serves it again without training (rule "
            f"serve_model), or link {legacy.name} (the weights training kept) as {self.SERVED}"
        )

    def _knows_served(self) -> bool:
        """Whether training wrote this folder with :attr:`served` (``best.json`` says so)."""
        return self.read_best().get("served") == self.SERVED

    def served_record(self) -> dict[str, Any]:
        """Which weights the folder serves: ``{"file", "iteration", "best"}`` (iteration: the
        iterations done when they were saved, as in ``metrics.jsonl``; best: whether they are the
        best evaluation's)."""
        source = self.read_classes().model_file
        record = self.read_best()
        best = source == self.BEST
        iteration = record.get("iteration") if best else record.get("final_iteration")
        return {"file": source, "iteration": iteration, "best": best}
