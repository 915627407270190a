"""Report assets: the per-class AP table."""

import json

import pandas as pd
import pytest

from d2retrain.report import ap_table, write_ap_table


def evaluation(models: dict[str, float]) -> tuple[dict, pd.DataFrame]:
    """metrics.json and per_class.csv contents where each model's AP is its value (person) and
    half of it (sports ball), for bbox and segm alike."""
    metrics = {
        model: {kind: {"AP": value * 0.75} for kind in ("bbox", "segm")} for model, value in models.items()
    }
    rows = [
        {"model": model, "kind": kind, "class": name, "AP": value * factor}
        for model, value in models.items()
        for kind in ("bbox", "segm")
        for name, factor in (("person", 1.0), ("sports ball", 0.5))
    ]
    return metrics, pd.DataFrame(rows)


def test_ap_table_puts_baseline_before_retrained_with_the_change_in_points():
    table = ap_table(*evaluation({"retrained": 0.6, "baseline": 0.4}))
    assert list(table.columns) == ["baseline", "retrained", "change"]
    assert list(table.index) == [
        (kind, name) for kind in ("bbox", "segm") for name in ("all classes", "person", "sports ball")
    ]
    assert table.loc[("segm", "person")].tolist() == pytest.approx([40.0, 60.0, 20.0])
    assert table.loc[("bbox", "all classes")].tolist() == pytest.approx([30.0, 45.0, 15.0])


def test_ap_table_without_baseline_has_no_change_column():
    table = ap_table(*evaluation({"retrained": 0.6}))
    assert list(table.columns) == ["retrained"]
    assert table.loc[("bbox", "sports ball"), "retrained"] == pytest.approx(30.0)


def test_the_ap_page_shows_every_class_with_one_decimal(tmp_path):
    metrics, per_class = evaluation({"retrained": 0.6123, "baseline": 0.4})
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    per_class.to_csv(tmp_path / "per_class.csv", index=False)
    write_ap_table(
        str(tmp_path / "metrics.json"), str(tmp_path / "per_class.csv"), str(tmp_path / "ap.html"), "a<b"
    )
    page = (tmp_path / "ap.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<h3>a&lt;b</h3>" in page
    assert page.count("<td>61.2</td>") == 2  # person, bbox and segm
    assert "sports ball" in page and "all classes" in page and "change" in page


def test_the_ap_page_says_which_weights_and_what_the_baseline_covers(tmp_path):
    metrics, per_class = evaluation({"retrained": 0.6, "baseline": 0.4})
    metrics["retrained"]["weights"] = {"file": "model_best.pth", "iteration": 200, "best": True}
    metrics["baseline"]["per_class"] = {"segm": {"person": 0.4}}  # ball has no COCO name here
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    per_class.to_csv(tmp_path / "per_class.csv", index=False)
    write_ap_table(
        str(tmp_path / "metrics.json"), str(tmp_path / "per_class.csv"), str(tmp_path / "a.html"), "t"
    )
    page = (tmp_path / "a.html").read_text()
    assert "model_best.pth, the weights of iteration 200 (the best val segm AP" in page
    assert "on the classes named as COCO categories (person); its &#x27;all classes&#x27; row" in page

    metrics.pop("baseline")
    metrics["retrained"]["weights"] = {"file": "model_final.pth", "iteration": 400, "best": False}
    metrics["retrained"]["no_baseline"] = "trained from scratch (model.weights: none)"
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    write_ap_table(
        str(tmp_path / "metrics.json"), str(tmp_path / "per_class.csv"), str(tmp_path / "b.html"), "t"
    )
    page = (tmp_path / "b.html").read_text()
    assert "model_final.pth, the weights of iteration 400 (the last)" in page
    assert "No baseline: trained from scratch (model.weights: none)." in page
