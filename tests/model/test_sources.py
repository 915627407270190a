"""Base weights and engine checked early: at planning time without torch, then by a job that runs first."""

import subprocess
import sys
import urllib.error

import pytest
import yaml
from helpers import REPO, detectron2_importable, filled

from d2retrain.core.errors import D2RetrainError, WeightsError
from d2retrain.model.sources import check_weights_file, resolve_engine


def test_a_local_weights_file_must_exist_and_start_as_a_checkpoint(tmp_path):
    import torch

    with pytest.raises(WeightsError, match=r"missing\.pth: no such file; set model\.weights"):
        check_weights_file(str(tmp_path / "missing.pth"))
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(WeightsError, match=r"not a checkpoint \(it starts with b'not '"):
        check_weights_file(str(tmp_path / "notes.pth"))
    torch.save({"w": torch.zeros(1)}, tmp_path / "real.pth")
    for fine in (
        str(tmp_path / "real.pth"),
        "none",
        "https://example.org/x.pth",
        "MaskRCNN_ResNet50_FPN_Weights.COCO_V1",
    ):
        check_weights_file(fine)  # URLs and names are left to the check_weights job


@pytest.mark.skipif(detectron2_importable(), reason="detectron2 is installed here: auto picks it")
def test_auto_with_a_detectron2_model_and_no_detectron2_says_so():
    with pytest.raises(
        D2RetrainError, match=r"is a detectron2 model, and model\.engine: auto found no detectron2"
    ):
        resolve_engine("auto", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    assert resolve_engine("auto", "maskrcnn_resnet50_fpn") == "torchvision"


def coco_shaped_checkpoint(path):
    """The demo network with COCO's 91 rows, saved as torch.save saves a state dict."""
    import torch

    from d2retrain.model.specs import model_spec, solver_spec
    from d2retrain.model.tv import build_model

    spec = model_spec(filled("model", {"architecture": "maskrcnn_resnet18_fpn"}), "torchvision")
    torch.save({"model": build_model(spec, 90, solver_spec(filled("train", {}))).state_dict()}, path)
    return path


def test_the_check_job_loads_the_weights_as_training_will_and_refuses_others(tmp_path):
    import torch

    from d2retrain.model.engines import check_weights

    model = {"engine": "torchvision", "architecture": "maskrcnn_resnet18_fpn"}
    weights = coco_shaped_checkpoint(tmp_path / "coco.pth")
    result = check_weights(model | {"weights": str(weights)}, ["person", "sports ball"], tmp_path / "ok.json")
    assert result["head_surgery"] and result["loaded"] > 100 and result["random"] == 0
    assert (tmp_path / "ok.json").is_file()
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")  # another network's weights
    with pytest.raises(WeightsError, match="none of its tensors belongs to maskrcnn_resnet18_fpn"):
        check_weights(model | {"weights": str(tmp_path / "other.pth")}, ["person"])


def test_an_unreachable_torchvision_weights_name_names_the_url_to_fetch(monkeypatch):
    import torch

    from d2retrain.model.headsurgery import load_state_dict_source

    def offline(url, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(
        WeightsError, match=r"offline, download https://download\.pytorch\.org/\S+ on a connected"
    ):
        load_state_dict_source("MaskRCNN_ResNet50_FPN_Weights.COCO_V1", torchvision_names=True)


def run_workflow(tmp_path, weights: str, *arguments: str) -> subprocess.CompletedProcess:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["model"] = {"weights": weights}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path)]
    command += ["--configfile", str(tmp_path / "config.yaml"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)


def test_the_workflow_refuses_a_missing_weights_file_before_any_job(tmp_path):
    result = run_workflow(tmp_path, "nowhere/coco.pth", "--cores", "1")
    assert result.returncode != 0
    assert (result.stdout + result.stderr).strip().splitlines() == [
        "config: model.weights nowhere/coco.pth: no such file; set model.weights to a checkpoint file"
    ]
    assert not (tmp_path / "resources").exists()


def test_unreachable_weights_fail_in_the_first_job_before_training(tmp_path):
    plan = run_workflow(tmp_path, "http://127.0.0.1:9/model_final.pth", "--dry-run")
    assert plan.returncode == 0 and "check_weights" in plan.stdout
    result = run_workflow(
        tmp_path, "http://127.0.0.1:9/model_final.pth", "--cores", "2", "--resources", "gpu=1"
    )
    assert result.returncode != 0
    log = (tmp_path / "logs" / "person_ball" / "check_weights.log").read_text()
    assert "offline, download http://127.0.0.1:9/model_final.pth on a connected machine" in log
    assert not (tmp_path / "logs" / "person_ball" / "train.log").exists()  # training never started
    default = run_workflow(tmp_path, "none", "--dry-run")
    assert "check_weights" not in default.stdout  # no base weights: nothing to check
