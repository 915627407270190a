"""The model card (``MODEL_CARD.md`` and its HTML for the report), written from a run's own files."""

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import markdown
import pandas as pd
import yaml

from d2retrain import __version__
from d2retrain.core.fileio import file_digest, write_text_atomic
from d2retrain.core.htmlpage import html_page
from d2retrain.core.mlflowlog import MlflowRun
from d2retrain.model.cococlasses import coco_category_ids
from d2retrain.model.folder import ClassInfo, ModelFolder
from d2retrain.report import ap_notes, ap_table

logger = logging.getLogger(__name__)

__all__ = ["CardInputs", "model_card", "write_model_card"]


@dataclasses.dataclass(frozen=True)
class CardInputs:
    """The files a model card is written from.

    Attributes:
        model_dir: The model folder (``classes.json``, ``config.yaml``, ``best.json``,
            ``metrics.jsonl``, the weights).
        metrics: ``eval/metrics.json``.
        per_class: ``eval/per_class.csv``.
        counts: ``stats/counts.csv`` (instances and images per split, step and category).
        data: The training and val files the model was trained and evaluated on (``{"train", "val"}``).
        datasets: Each dataset the subset reads, with its splits' files as the config gives them.
    """

    model_dir: str
    metrics: str
    per_class: str
    counts: str
    data: Mapping[str, str]
    datasets: Mapping[str, Mapping]


def model_card(subset: str, inputs: CardInputs) -> str:
    """The model card of a subset's model as Markdown.

    Args:
        subset: The subset's name (the card's title).
        inputs: The run's files the card is written from.

    Returns:
        The card: classes and their COCO rows, data and counts, base weights, engine and config,
        training length and best iteration, AP baseline vs retrained per class, hashes, intended
        use and known limits.
    """
    folder = ModelFolder(inputs.model_dir)
    info = folder.read_classes()
    config = folder.read_config()
    metrics = json.loads(Path(inputs.metrics).read_text())
    counts = pd.read_csv(inputs.counts)
    names = ", ".join(info.classes)
    sections = [
        f"# Model card: {subset}\n\n"
        f"Mask R-CNN ({info.architecture}, {info.engine} engine) that detects and segments {names}. "
        f"Written by d2retrain {__version__} from the run's own files; do not edit, rerun the workflow.",
        _classes_section(info, config["model"].get("coco_names", {})),
        _data_section(inputs, counts),
        _training_section(info, config, folder),
        _evaluation_section(metrics, pd.read_csv(inputs.per_class)),
        _hashes_section(info, inputs, folder),
        _limits_section(info, config, metrics, counts, inputs.data["val"]),
    ]
    return "\n\n".join(sections) + "\n"


def write_model_card(
    subset: str, inputs: CardInputs, markdown_path: str, html_path: str, track: bool = False
) -> None:
    """Write the model card as Markdown and as an HTML page for the report.

    Args:
        subset: The subset's name (the card's title).
        inputs: The run's files the card is written from.
        markdown_path: ``MODEL_CARD.md``.
        html_path: The page for the report.
        track: Add the card to the model's MLflow run, when its training was tracked.
    """
    text = model_card(subset, inputs)
    write_text_atomic(markdown_path, text)
    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    write_text_atomic(html_path, html_page(f"Model card: {subset}", body))
    logger.info("model card of %s -> %s, %s", subset, markdown_path, html_path)
    run = MlflowRun.attach(ModelFolder(inputs.model_dir).checkpoints) if track else None
    if run is not None:
        run.log_artifacts([markdown_path])


def _table(frame: pd.DataFrame, index: bool = False) -> str:
    return frame.to_markdown(index=index, floatfmt=".1f")


def _classes_section(info: ClassInfo, coco_names: Mapping[str, str]) -> str:
    rows = [
        {
            "index": index,
            "class": name,
            "id in the data": source,
            "COCO category id": coco if coco is not None else "- (not a COCO category)",
        }
        for index, (name, source, coco) in enumerate(
            zip(info.classes, info.source_ids, coco_category_ids(info.classes, coco_names), strict=True)
        )
    ]
    return (
        "## Classes\n\nIn model order: label `index + 1` of the outputs (0 is the background). "
        "The COCO category id is the row of COCO's head the class started from.\n\n"
        + _table(pd.DataFrame(rows))
    )


def _data_section(inputs: CardInputs, counts: pd.DataFrame) -> str:
    lines = ["## Data", ""]
    for name, dataset in inputs.datasets.items():
        for split, files in dataset.items():
            if isinstance(files, Mapping) and "annotations" in files:
                lines.append(f"- `{name}` {split}: `{files['annotations']}`, images in `{files['images']}`")
    lines += [
        "",
        "Instances (images) per category at each step: as read, after filtering to the classes, after "
        "balancing (train only; val stays as filtered, for honest AP).",
    ]
    for split, part in counts.groupby("split", sort=False):
        steps = list(dict.fromkeys(part["step"]))
        categories = list(dict.fromkeys(part["category"]))
        cells = part.assign(cell=part["instances"].map(_count) + " (" + part["images"].map(_count) + ")")
        table = cells.pivot_table(index="category", columns="step", values="cell", aggfunc="first")
        lines += ["", f"**{split!s}**", "", _table(table.loc[categories, steps], index=True)]
    return "\n".join(lines)


def _count(value: float) -> str:
    """A count as an integer; an expected count per epoch (``balance: repeat``) with one decimal."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _training_section(info: ClassInfo, config: dict, folder: ModelFolder) -> str:
    model, solver = config["model"], config["solver"]
    best = folder.read_best()
    served = folder.served_record()
    records = [json.loads(line) for line in folder.metrics.read_text().splitlines()]
    losses = [record for record in records if "total_loss" in record]
    minutes = sum(record.get("time", 0.0) for record in losses) / 60
    base = model["weights"]
    lines = [
        "## Base weights and training",
        "",
        f"- Base weights: `{base}`"
        + (
            " (trained from scratch)"
            if base == "none"
            else f", head surgery {'on' if model['head_surgery'] else 'off'}"
        ),
        f"- Engine: {info.engine}, architecture {info.architecture}",
        f"- Trained {best.get('final_iteration')} iterations of {solver['images_per_batch']} images "
        f"({minutes:.1f} min of iterations), "
        f"base learning rate {solver['base_lr']}",
        f"- Input sizes: shortest edge {solver['min_size_train']} (cap {solver['max_size_train']}) in "
        f"training, {model['min_size_test']} (cap {model['max_size_test']}) at inference",
    ]
    if served["best"]:
        lines.append(
            f"- Served weights: `{folder.served.name}` (`{served['file']}`), iteration "
            f"{served['iteration']}, the best val {best['metric']} of the evaluations during training "
            f"({best['value']:.3f})"
        )
    else:
        lines.append(
            f"- Served weights: `{folder.served.name}` (`{served['file']}`), the last iteration's "
            f"({served['iteration']})"
        )
    lines += [
        "",
        "Configuration (`config.yaml` of the model folder):",
        "",
        "```yaml",
        yaml.safe_dump(config).strip(),
        "```",
    ]
    return "\n".join(lines)


def _evaluation_section(metrics: dict, per_class: pd.DataFrame) -> str:
    table = ap_table(metrics, per_class).reset_index()
    notes = "".join(f"\n\n{note}" for note in ap_notes(metrics))
    return "## Evaluation\n\nCOCO AP (%) on the val split, per class." + notes + "\n\n" + _table(table)


def _hashes_section(info: ClassInfo, inputs: CardInputs, folder: ModelFolder) -> str:
    files: dict[str, str | os.PathLike[str]] = {
        "training data": inputs.data["train"],
        "val data": inputs.data["val"],
        "config": folder.config_file,
        "weights": folder.served_weights(),
    }
    rows = [
        {"what": what, "file": Path(path).name, "SHA-256": file_digest(path)} for what, path in files.items()
    ]
    return (
        "## Hashes\n\n"
        f"Training fingerprint (model, solver, classes and training data): `{info.fingerprint}`.\n\n"
        + _table(pd.DataFrame(rows))
    )


def _limits_section(info: ClassInfo, config: dict, metrics: dict, counts: pd.DataFrame, val_json: str) -> str:
    solver, test_size = config["solver"], config["model"]["min_size_test"]
    lines = [
        "## Intended use and known limits",
        "",
        f"- For finding {', '.join(info.classes)} in images like the training data above. Every other "
        "kind of object was never seen as such: it is missed, or taken for one of these classes.",
        f"- Trained at a shortest edge of {min(solver['min_size_train'])}-{max(solver['min_size_train'])} "
        f"pixels, inferred at {test_size}: objects far smaller than those in training are "
        "found less well.",
    ]
    if config["model"]["weights"] == "none":
        lines.append("- Trained from scratch: it knows only what its training images show.")
    val = counts[counts["split"] == "val"]
    final = val[val["step"] == val["step"].iloc[-1]] if len(val) else val
    images = len(json.loads(Path(val_json).read_text())["images"])
    if images < 500:
        lines.append(f"- Evaluated on {images} val images: its AP figures carry a few points of noise.")
    for name in _unseen(final, info.classes):
        lines.append(f"- `{name}` has no val instance: its AP is undefined.")
    lines += [f"- `{name}`: retrained AP below the base model's." for name in _worse(metrics)]
    return "\n".join(lines)


def _unseen(final: pd.DataFrame, classes: Sequence[str]) -> list[str]:
    counted = dict(zip(final["category"], final["instances"], strict=True))
    return [name for name in classes if counted.get(name, 0) == 0]


def _worse(metrics: dict) -> list[str]:
    if "baseline" not in metrics:
        return []
    baseline = metrics["baseline"]["per_class"]["segm"]
    retrained = metrics["retrained"]["per_class"]["segm"]
    return [name for name, value in baseline.items() if retrained.get(name, 0) < value]
