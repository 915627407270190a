"""The model card: written from a run's files, its tables equal to them, its limits derived from them."""

import json
import os
from pathlib import Path

import pandas as pd
import yaml

from d2retrain.card import CardInputs, model_card, write_model_card
from d2retrain.core.fileio import file_digest
from d2retrain.data.stats import COLUMNS
from d2retrain.model.evaluation import write_evaluation
from d2retrain.model.folder import ClassInfo, ModelFolder

CLASSES = ["person", "sports ball", "kite"]


def report(ap: dict[str, float]) -> dict:
    """An evaluation report whose summary AP is the mean of the per-class AP."""
    mean = sum(ap.values()) / len(ap)
    return {kind: {"AP": mean} for kind in ("bbox", "segm")} | {"per_class": {"bbox": ap, "segm": ap}}


def model_folder(root: Path) -> Path:
    """A model folder as training writes it (weights: any bytes; the card only hashes them)."""
    folder = root / "model"
    folder.mkdir()
    info = ClassInfo(
        CLASSES, [3, 1, 7], "torchvision", "maskrcnn_resnet50_fpn", "coco.pth", "f" * 20, "model_best.pth"
    )
    ModelFolder(folder).write_classes(info)
    solver = {
        "images_per_batch": 4,
        "base_lr": 0.01,
        "min_size_train": [640, 800],
        "max_size_train": 1333,
        "min_size_test": 800,
        "max_size_test": 1333,
    }
    model = {"weights": "coco.pth", "head_surgery": True, "coco_names": {"kite": "kite"}}
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model, "solver": solver}))
    (folder / "best.json").write_text(
        json.dumps(
            {
                "iteration": 200,
                "metric": "segm_AP",
                "value": 0.41,
                "final_iteration": 300,
                "kept": "model_best.pth",
                "served": "model.pth",
            }
        )
    )
    (folder / "metrics.jsonl").write_text(
        "".join(json.dumps({"iteration": i, "total_loss": 1.0, "time": 0.5}) + "\n" for i in range(1, 301))
    )
    (folder / "model_best.pth").write_bytes(b"weights" * 1000)
    os.link(folder / "model_best.pth", folder / "model.pth")
    return folder


def card_inputs(tmp_path: Path) -> CardInputs:
    folder = model_folder(tmp_path)
    retrained = report({"person": 0.5, "sports ball": 0.2, "kite": 0.0}) | {
        "weights": {"file": "model_best.pth", "iteration": 200, "best": True}
    }
    reports = {"retrained": retrained, "baseline": report({"person": 0.4, "sports ball": 0.3, "kite": 0.1})}
    write_evaluation(reports, str(tmp_path / "metrics.json"), str(tmp_path / "per_class.csv"))
    rows = [
        ("train", "", step, name, instances, images)
        for step, scale in (("input", 3), ("filtered", 3), ("balanced", 1))
        for name, instances, images in (("person", 40, 20), ("sports ball", 12, 10), ("kite", 5, 4))
        for instances, images in [(instances * scale, images * scale)]
    ] + [
        ("val", "", step, name, n, n)
        for step in ("input", "filtered")
        for name, n in (("person", 9), ("sports ball", 3), ("kite", 0))
    ]
    pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp_path / "counts.csv", index=False)
    data = {}
    for split, count in (("train", 30), ("val", 9)):
        data[split] = str(tmp_path / f"{split}.json")
        Path(data[split]).write_text(json.dumps({"images": [{"id": i} for i in range(count)]}))
    return CardInputs(
        str(folder),
        str(tmp_path / "metrics.json"),
        str(tmp_path / "per_class.csv"),
        str(tmp_path / "counts.csv"),
        data,
        {"mine": {"train": {"annotations": "mine/train.json", "images": "mine/images"}}},
    )


def table(card: str, heading: str) -> list[list[str]]:
    section = card.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # header and separator left out


def test_the_card_tables_hold_the_runs_ap_classes_and_hashes(tmp_path):
    inputs = card_inputs(tmp_path)
    card = model_card("mine", inputs)
    assert table(card, "## Classes") == [
        ["0", "person", "3", "1"],
        ["1", "sports ball", "1", "37"],
        ["2", "kite", "7", "38"],
    ]
    ap = {(kind, name): cells for kind, name, *cells in table(card, "## Evaluation")}
    assert ap[("segm", "person")] == ["40.0", "50.0", "10.0"]  # baseline, retrained, change
    assert ap[("bbox", "sports ball")] == ["30.0", "20.0", "-10.0"]
    assert ap[("segm", "all classes")] == ["26.7", "23.3", "-3.3"]
    weights = file_digest(Path(inputs.model_dir) / "model_best.pth")
    assert ["weights", "model.pth", weights] in table(card, "## Hashes")
    assert ["val data", "val.json", file_digest(inputs.data["val"])] in table(card, "## Hashes")
    assert "Trained 300 iterations of 4 images (2.5 min of iterations)" in card
    assert "iteration 200, the best val segm_AP of the evaluations during training (0.410)" in card
    assert "- `mine` train: `mine/train.json`, images in `mine/images`" in card


def test_the_card_names_the_limits_its_numbers_show(tmp_path):
    card = model_card("mine", card_inputs(tmp_path))
    limits = card.split("## Intended use and known limits\n", 1)[1]
    assert "- `kite` has no val instance: its AP is undefined." in limits
    assert "- `sports ball`: retrained AP below the base model's." in limits
    assert "- `kite`: retrained AP below the base model's." in limits
    assert "person`: retrained" not in limits
    assert "Evaluated on 9 val images" in limits
    assert "shortest edge of 640-800 pixels, inferred at 800" in limits
    assert "from scratch" not in limits


def test_the_card_is_written_as_markdown_and_as_a_page_for_the_report(tmp_path):
    write_model_card(
        "mine", card_inputs(tmp_path), str(tmp_path / "MODEL_CARD.md"), str(tmp_path / "card.html")
    )
    page = (tmp_path / "card.html").read_text()
    assert (tmp_path / "MODEL_CARD.md").read_text().startswith("# Model card: mine\n")
    assert page.startswith("<!DOCTYPE html>") and "<title>Model card: mine</title>" in page
    assert page.count("<table>") == 5  # classes, train and val counts, AP, hashes (the config is code)
    assert '<pre><code class="language-yaml">' in page


def test_counts_are_integers_and_expected_counts_per_epoch_keep_one_decimal(tmp_path):
    inputs = card_inputs(tmp_path)
    counts = pd.read_csv(inputs.counts)
    repeat = counts[(counts.split == "train") & (counts.step == "balanced")].assign(step="repeat")
    repeat[["instances", "images"]] = repeat[["instances", "images"]] * 1.35
    pd.concat([counts, repeat]).to_csv(inputs.counts, index=False)  # as balance: repeat writes it
    card = model_card("mine", inputs)
    train = card.split("\n**train**\n", 1)[1].split("\n**val**", 1)[0]
    rows = {row[0]: row[1:] for row in table("\n**train**\n" + train, "**train**")}
    assert rows["person"] == ["120 (60)", "120 (60)", "40 (20)", "54 (27)"]
    assert rows["kite"][-1] == "6.8 (5.4)"
