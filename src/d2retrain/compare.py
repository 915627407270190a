"""Experiments side by side: one row per trained model, the variant a val metric selects, AP curves.

A row is read from a run's own files: ``model/`` (``best.json``, ``metrics.jsonl``, ``config.yaml``)
and the evaluations beside it (``eval/metrics.json``, ``eval/test_metrics.json``). The workflow
writes ``results/<subset>/experiments.csv`` and ``selected.json`` with it; ``d2retrain compare``
prints the same table for folders made by hand.
"""

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from d2retrain.core.config import dotted_keys
from d2retrain.core.errors import D2RetrainError
from d2retrain.core.fileio import copy_files, write_figure, write_text_atomic
from d2retrain.core.mlflowlog import copy_run_state
from d2retrain.model.folder import ModelFolder

logger = logging.getLogger(__name__)

__all__ = [
    "Run",
    "ComparisonFiles",
    "select_experiment",
    "serve_selected",
    "find_run",
    "comparison_table",
    "select_run",
    "variant_summary",
    "plot_val_curves",
    "write_comparison",
]

KINDS = ("segm", "bbox")


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained model and its evaluations.

    Attributes:
        name: Its name in the table (the experiment's, or the folder's).
        model: Its model folder.
        val: ``eval/metrics.json`` on the val split, or None when it was not evaluated.
        test: ``eval/test_metrics.json`` on the test split, or None.
        overrides: What the variant changes (dotted key -> value).
        variant: The variant it is a seed of (its own name when it has one seed).
    """

    name: str
    model: ModelFolder
    val: Path | None
    test: Path | None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    variant: str = ""

    @functools.cached_property
    def records(self) -> list[dict[str, Any]]:
        """The training's ``metrics.jsonl`` records (losses by iteration, evaluations), read once."""
        path = self.model.metrics
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_run(folder: str | os.PathLike[str], name: str | None = None) -> Run:
    """A run from an experiment folder (``model/`` and ``eval/`` inside) or a model folder
    (``eval/`` beside it, as in ``results/<subset>/``).

    Raises:
        D2RetrainError: The folder holds no trained model.
    """
    folder = Path(folder)
    model = ModelFolder(folder / "model") if (folder / "model").is_dir() else ModelFolder(folder)
    if not model.metrics.is_file():
        raise D2RetrainError(f"{folder}: no trained model here (no model/metrics.jsonl or metrics.jsonl)")
    evaluations = model.path.parent / "eval"
    val, test = evaluations / "metrics.json", evaluations / "test_metrics.json"
    return Run(
        name or (folder.name if folder.name != "model" else folder.parent.name),
        model,
        val if val.is_file() else None,
        test if test.is_file() else None,
    )


def comparison_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run: its overrides (or, for runs without, the config keys that differ between
    them), val and test segm and bbox AP and per-class AP, iterations, training minutes and the best
    evaluation's iteration."""
    differing = _differing_keys(runs) if not any(run.overrides for run in runs) else {}
    rows = []
    for run in runs:
        curve = run.records
        best = json.loads(run.model.best_file.read_text()) if run.model.best_file.is_file() else {}
        overrides = run.overrides or differing.get(run.name, {})
        row: dict[str, Any] = {
            "experiment": run.name,
            "variant": run.variant or run.name,
            "overrides": ", ".join(f"{key}={value}" for key, value in overrides.items()),
        }
        for split, path in (("val", run.val), ("test", run.test)):
            row |= _ap_columns(split, path)
        row |= {
            "iterations": max((record["iteration"] for record in curve), default=0),
            "train_minutes": round(sum(record.get("time", 0.0) for record in curve) / 60, 2),
            "best_iteration": best.get("iteration"),
        }
        rows.append(row)
    return pd.DataFrame(rows)


def select_run(table: pd.DataFrame, metric: str) -> dict[str, Any]:
    """The variant with the highest mean val ``metric`` over its seeds (the first on a tie), and
    its run with the highest val ``metric`` (the one served), as ``selected.json`` records them.

    Returns:
        ``experiment`` (the served run), ``metric``, ``value`` and ``test_value`` (that run's val
        and test metric), ``split``, and for its variant ``variant``, ``seeds``, ``mean``,
        ``spread`` (the standard deviation over its seeds, 0 for one), ``test_mean``, and
        ``within_spread``: the other variants whose mean is within one spread (theirs or its) of
        it, where either has several seeds.

    Raises:
        D2RetrainError: No run has the metric on val.
    """
    column = f"val_{metric}"
    scored = table.dropna(subset=[column]) if column in table else table.iloc[0:0]
    if scored.empty:
        raise D2RetrainError(f"no run has a val {metric} to select on: evaluate them first")
    summary = variant_summary(scored, metric)
    chosen = summary.iloc[int(summary["mean"].to_numpy().argmax())]
    runs = scored[scored["variant"] == chosen.name]
    best = runs.iloc[int(runs[column].to_numpy().argmax())]
    test = best.get(f"test_{metric}")
    spread = summary["spread"].clip(lower=chosen["spread"])
    close = (summary.index != chosen.name) & ((summary["mean"] - chosen["mean"]).abs() <= spread)
    close &= (summary["seeds"] > 1) | (chosen["seeds"] > 1)
    return {
        "experiment": str(best["experiment"]),
        "metric": metric,
        "value": float(best[column]),
        "split": "val",
        "test_value": _number(test),
        "variant": str(chosen.name),
        "seeds": int(chosen["seeds"]),
        "mean": float(chosen["mean"]),
        "spread": float(chosen["spread"]),
        "test_mean": _number(chosen["test_mean"]),
        "within_spread": [str(name) for name in summary.index[close]],
    }


def variant_summary(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per variant, in the table's order: ``seeds``, the ``mean`` and ``spread`` (sample standard
    deviation, 0 for one seed) of the val ``metric``, and the ``test_mean``."""
    groups = table.groupby("variant", sort=False)
    values = groups[f"val_{metric}"]
    test = f"test_{metric}"
    return pd.DataFrame(
        {
            "seeds": values.count(),
            "mean": values.mean(),
            "spread": values.std(ddof=1).fillna(0.0),
            "test_mean": groups[test].mean() if test in table else float("nan"),
        }
    )


def _number(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def plot_val_curves(runs: Sequence[Run], metric: str, path: str | os.PathLike[str]) -> None:
    """The val ``metric`` of every run by iteration (its evaluations during training), one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        points = [(r["iteration"], r[metric]) for r in run.records if metric in r]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=run.name)
    axes.set_xlabel("iteration")
    axes.set_ylabel(f"val {metric}")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize="small", loc="lower right")
    write_figure(path, figure, f"Val {metric} during training, per experiment")


@dataclasses.dataclass(frozen=True)
class ComparisonFiles:
    """Where :func:`write_comparison` writes.

    Attributes:
        table: The table (CSV).
        page: The table and the selection, in words (HTML, for the report).
        plot: The val curves (PNG).
        selected: ``selected.json`` (experiment, metric, value, test_value).
    """

    table: str
    page: str
    plot: str
    selected: str


def write_comparison(runs: Sequence[Run], metric: str, files: ComparisonFiles, title: str) -> dict[str, Any]:
    """Select the run with the best val ``metric`` and write the comparison's files.

    Returns:
        The selection, as written to ``files.selected``.

    Raises:
        D2RetrainError: No run has the metric on val.
    """
    table = comparison_table(runs)
    selected = select_run(table, metric)
    table.insert(1, "selected", table["experiment"] == selected["experiment"])
    if (table["variant"] != table["experiment"]).any():  # seeds: each variant's mean and spread
        summary = variant_summary(table.dropna(subset=[f"val_{metric}"]), metric)
        table.insert(3, f"mean_val_{metric}", table["variant"].map(summary["mean"]))
        table.insert(4, f"spread_val_{metric}", table["variant"].map(summary["spread"]))
        table.insert(5, "within_spread", table["variant"].isin(selected["within_spread"]))
    write_text_atomic(files.table, table.to_csv(index=False))
    plot_val_curves(runs, metric, files.plot)
    write_text_atomic(files.page, _page(table, selected, title))
    write_text_atomic(files.selected, json.dumps(selected, indent=2) + "\n")
    logger.info("selected %s: %s", selected["experiment"], _verdict(selected))
    return selected


def select_experiment(
    folders: Mapping[str, str],
    overrides: Mapping[str, Mapping[str, Any]],
    variants: Mapping[str, str],
    metric: str,
    files: ComparisonFiles,
    title: str,
) -> dict[str, Any]:
    """The workflow's select job: each experiment folder's run (:func:`find_run`) with its
    overrides and variant, compared and selected by :func:`write_comparison`."""
    runs = [
        dataclasses.replace(find_run(folder, name), overrides=overrides[name], variant=variants[name])
        for name, folder in folders.items()
    ]
    return write_comparison(runs, metric, files, title)


def serve_selected(sources: Mapping[str, str], targets: Mapping[str, str]) -> None:
    """The workflow's serve_selected jobs: the selected run's files copied to the subset's
    (:func:`~d2retrain.core.fileio.copy_files`, keyed alike); with its model (``served``), the MLflow
    run its training was tracked in, so that the model card goes to that run."""
    copy_files(sources, targets)
    if "served" in targets:
        copy_run_state(
            ModelFolder(Path(sources["served"]).parent).checkpoints,
            ModelFolder(Path(targets["served"]).parent).checkpoints,
        )


def _verdict(selected: Mapping[str, Any]) -> str:
    """Which number selected, and which one to quote."""
    metric, value = selected["metric"], selected["value"]
    chose = f"the highest val {metric} ({value:.4f}) selected it"
    if selected["seeds"] > 1:
        chose = (
            f"variant {selected['variant']} has the highest mean val {metric} over its {selected['seeds']} "
            f"seeds, {selected['mean']:.4f} (spread {selected['spread']:.4f}), and this is its best seed "
            f"({value:.4f})"
        )
    if selected["within_spread"]:
        chose += f"; {', '.join(selected['within_spread'])} within the spread: the difference may be noise"
    if selected["test_value"] is None:
        return (
            f"{chose}; there is no test split, so this val {metric} is optimistic (it was used to choose): "
            "give the dataset a test split for an unbiased estimate"
        )
    quote = f"{chose}; its test {metric}, {selected['test_value']:.4f}, is the estimate to quote"
    if selected["seeds"] > 1:
        quote += f" (the variant's mean over its seeds: {selected['test_mean']:.4f})"
    return quote


def _page(table: pd.DataFrame, selected: Mapping[str, Any], title: str) -> str:
    import html

    from d2retrain.core.htmlpage import html_page

    per_class = [c for c in table.columns if "_AP_" in str(c) or str(c).endswith(("APs", "APm", "APl"))]
    shown = table.drop(columns=per_class)  # per class and per size: in the CSV
    body = shown.to_html(index=False, float_format="{:.3f}".format, na_rep="-")
    verdict = f"<p><b>{html.escape(selected['experiment'])}</b>: {html.escape(_verdict(selected))}.</p>"
    return html_page(title, f"<h3>{html.escape(title)}</h3>{verdict}{body}")


def _ap_columns(split: str, path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    retrained = json.loads(path.read_text())["retrained"]
    columns: dict[str, Any] = {}
    for kind in KINDS:
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):  # every metric `select` may name
            columns[f"{split}_{kind}_{key}"] = retrained[kind].get(key)
    for kind in KINDS:
        for name, value in retrained["per_class"][kind].items():
            columns[f"{split}_{kind}_AP_{name}"] = value
    return columns


def _differing_keys(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Per run, the keys of its ``config.yaml`` (model, solver, data) whose value differs between runs."""
    import yaml

    flat = {}
    for run in runs:
        config = yaml.safe_load(run.model.config_file.read_text()) if run.model.config_file.is_file() else {}
        flat[run.name] = dotted_keys({key: config.get(key) for key in ("model", "solver", "train")})
    keys = sorted({key for values in flat.values() for key in values})
    varying = [key for key in keys if len({repr(values.get(key)) for values in flat.values()}) > 1]
    return {name: {key: values.get(key) for key in varying} for name, values in flat.items()}
