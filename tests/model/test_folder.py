"""The model folder: one owner of its file names, the served weights, folders written before them."""

import json
import os

import pytest

from d2retrain.model.folder import ClassInfo, ModelFolder, ModelFolderError

INFO = ClassInfo(["kite", "person"], [38, 1], "torchvision", "maskrcnn_resnet18_fpn", "none", "f" * 20)


def trained_folder(path, served: str | None) -> ModelFolder:
    """A folder as training writes it: final and best weights, classes and best record naming the
    served file; ``served``: which weights ``model.pth`` links to (None: a folder written before it)."""
    folder = ModelFolder(path)
    path.mkdir()
    folder.final_weights.write_bytes(b"final")
    folder.best_weights.write_bytes(b"best")
    folder.write_classes(ClassInfo(**{**INFO.__dict__, "model_file": served or "model_best.pth"}))
    record = {
        "iteration": 2,
        "metric": "segm_AP",
        "value": 0.5,
        "final_iteration": 4,
        "kept": "model_best.pth",
    }
    if served is not None:
        folder.write_best(record | {"kept": served, "served": "model.pth"})
        folder.serve(folder.path / served)
    else:
        folder.write_best(record | {"kept": "model_best.pth"})
    return folder


@pytest.mark.parametrize("served", ["model_best.pth", "model_final.pth"])
def test_the_served_file_is_the_kept_weights_under_one_fixed_name(tmp_path, served):
    folder = trained_folder(tmp_path / "model", served)
    assert folder.served_weights() == tmp_path / "model" / "model.pth"
    assert folder.served.read_bytes() == (tmp_path / "model" / served).read_bytes()
    best = served == "model_best.pth"
    assert folder.served_record() == {"file": served, "iteration": 2 if best else 4, "best": best}


def test_serving_again_replaces_the_link_and_leaves_the_weights_alone(tmp_path):
    folder = trained_folder(tmp_path / "model", "model_best.pth")
    folder.serve(folder.final_weights)
    assert folder.served.read_bytes() == b"final" and folder.best_weights.read_bytes() == b"best"
    assert sorted(os.listdir(folder.path)) == [
        "best.json",
        "classes.json",
        "model.pth",
        "model_best.pth",
        "model_final.pth",
    ]  # no temporary left behind


def test_a_deleted_served_file_fails_with_what_to_do(tmp_path):
    folder = trained_folder(tmp_path / "model", "model_best.pth")
    folder.served.unlink()
    with pytest.raises(
        ModelFolderError,
        match=r"model\.pth: missing; the workflow's next run serves it again .* link model_best\.pth",
    ):
        folder.served_weights()


def test_a_folder_written_before_the_served_file_loads_the_weights_its_classes_name(tmp_path, caplog):
    folder = trained_folder(tmp_path / "model", None)
    with caplog.at_level("INFO"):
        assert folder.served_weights() == folder.best_weights
    assert "no model.pth (trained before it existed); loading model_best.pth" in caplog.text
    folder.best_weights.unlink()
    with pytest.raises(ModelFolderError, match="serves it again without training"):
        folder.served_weights()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"classes\.json: missing; is .* a folder written by d2retrain train\?"),
        ("{not json", r"classes\.json: unreadable"),
        (json.dumps({"classes": ["kite"]}), r"classes\.json: unreadable"),
    ],
)
def test_a_broken_classes_file_is_one_clear_error(tmp_path, content, message):
    folder = ModelFolder(tmp_path)
    if content is not None:
        folder.classes_file.write_text(content)
    with pytest.raises(ModelFolderError, match=message):
        folder.read_classes()


def test_other_classes_are_refused_with_both_lists(tmp_path):
    folder = trained_folder(tmp_path / "model", "model_best.pth")
    assert folder.read_classes(["kite", "person"]).source_ids == [38, 1]
    with pytest.raises(ModelFolderError, match=r"trained for classes \['kite', 'person'\], not \['person'\]"):
        folder.read_classes(["person"])


def test_serving_the_kept_weights_again_keeps_their_time_stamp(tmp_path):
    """What the workflow's serve_model rule does after the served file was deleted: the same bytes
    (inference keeps its outputs), a link to the weights rather than a copy."""
    folder = trained_folder(tmp_path / "model", "model_best.pth")
    folder.served.unlink()
    assert folder.serve_kept() == folder.served
    assert folder.served.read_bytes() == b"best"
    assert folder.served.stat().st_ino == folder.best_weights.stat().st_ino  # a link, not a copy
    folder.best_weights.unlink()
    with pytest.raises(ModelFolderError, match=r"model_best\.pth: missing, and classes\.json names it"):
        folder.serve_kept()


def test_a_folder_written_when_test_sizes_were_the_solvers_loads_them_as_the_models(tmp_path):
    import yaml

    from d2retrain.model.engines import read_model_config

    old = {
        "model": {"engine": "torchvision", "architecture": "maskrcnn_resnet18_fpn", "weights": "none"},
        "solver": {"iterations": 10, "min_size_test": 800, "max_size_test": 1333},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    record = ModelFolder(tmp_path).read_config()
    assert record["model"]["min_size_test"] == 800 and "min_size_test" not in record["solver"]
    spec = read_model_config(tmp_path)  # keys added since (freeze_at, coco_names...) take their defaults
    assert (spec.min_size_test, spec.max_size_test, spec.freeze_at, spec.coco_names) == (800, 1333, 2, {})
