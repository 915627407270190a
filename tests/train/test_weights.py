"""Starting weights: head surgery by COCO name, frozen stages, pickles refused, other ids, baselines."""

import json

import pytest
import torch
from helpers import COCO_MINI, filled
from helpers.training import (
    TINY,
    evaluate_mini,
    mini_inputs,
)

from d2retrain.core.errors import D2RetrainError
from d2retrain.data.filtering import FilterOptions
from d2retrain.data.prepare import filter_file
from d2retrain.model import tv as tv_engine
from d2retrain.model.folder import ModelFolder
from d2retrain.model.specs import model_spec, solver_spec
from d2retrain.train.run import train_from_config


def test_head_surgery_keeps_the_chosen_classes_outputs_exactly(tmp_path):
    torch.manual_seed(0)
    solver = solver_spec(filled("train", {"min_size_train": [128], "max_size_train": 200}))
    full_spec = model_spec(filled("model", {"architecture": "maskrcnn_resnet18_fpn"}), "torchvision")
    full = tv_engine.build_model(full_spec, 90, solver).eval()  # 91 rows: a COCO-shaped model
    torch.save({"model": full.state_dict()}, tmp_path / "coco.pth")
    ids = [37, 1]  # sports ball, person: the rows head surgery must pick, by name
    spec = model_spec(
        filled("model", {"architecture": "maskrcnn_resnet18_fpn", "weights": str(tmp_path / "coco.pth")}),
        "torchvision",
    )
    subset = tv_engine.build_model(spec, len(ids), solver).eval()
    state, surgery = tv_engine.initial_state(spec, ["sports ball", "person"], subset)
    assert surgery
    subset.load_state_dict(state)
    image = torch.rand(1, 3, 128, 160)
    proposals = [torch.tensor([[10.0, 10, 80, 90], [30, 5, 60, 40], [0, 0, 150, 120]])]
    sizes = [(128, 160)]
    rows = [0, *ids]
    with torch.no_grad():
        outputs = []
        for model in (full, subset):
            features = model.backbone(image)
            heads = model.roi_heads
            boxes = heads.box_head(heads.box_roi_pool(features, proposals, sizes))
            logits, deltas = heads.box_predictor(boxes)
            masks = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, proposals, sizes)))
            outputs.append((logits, deltas.view(3, -1, 4), masks))
    (full_logits, full_deltas, full_masks), (logits, deltas, masks) = outputs
    # equal up to float rounding (GEMMs of another width sum in another order)
    torch.testing.assert_close(logits, full_logits[:, rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deltas, full_deltas[:, rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masks, full_masks[:, rows], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits, full_logits[:, :3], atol=1e-3), "rows 0..2 differ from the chosen ones"


@pytest.mark.slow
def test_coco_base_weights_give_a_baseline_beside_the_retrained_model(mini_split, tmp_path):
    _, paths = mini_split
    solver = solver_spec(filled("train", {"min_size_train": [128], "max_size_train": 200}))
    coco_shaped = tv_engine.build_model(
        model_spec(filled("model", {"architecture": "maskrcnn_resnet18_fpn"}), "torchvision"), 90, solver
    )
    torch.save({"model": coco_shaped.state_dict()}, tmp_path / "coco.pth")
    model = {"architecture": "maskrcnn_resnet18_fpn", "weights": str(tmp_path / "coco.pth")}
    train_from_config(model=model, train=TINY | {"iterations": 2}, **mini_inputs(paths, tmp_path / "m"))
    reports = evaluate_mini(tmp_path / "m", paths, tmp_path, ["person", "sports ball"], "e.json", "e.csv")
    assert set(reports) == {"retrained", "baseline"}
    rows = (tmp_path / "e.csv").read_text().splitlines()
    assert rows[0] == "model,kind,class,AP" and any(
        row.startswith("baseline,segm,sports ball,") for row in rows
    )


@pytest.mark.parametrize(
    ("weights", "words"),
    [
        ("http://127.0.0.1:9/model_final.pth", "cannot be downloaded"),
        ("no/such/file.pth", "no such file"),
        ("NotAWeights.NAME", "not a file, URL or torchvision weights name"),
    ],
)
def test_unusable_weights_say_what_to_do(weights, words, tmp_path, monkeypatch):
    from d2retrain.model.headsurgery import WeightsError, load_state_dict_source

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=words) as caught:
        load_state_dict_source(weights, torchvision_names=True)
    if words == "cannot be downloaded":
        assert "offline, download http://127.0.0.1:9/model_final.pth on a connected machine" in str(
            caught.value
        )


class _Payload:
    """A pickled object whose loading would run code (creates a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pth_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    from d2retrain.model.headsurgery import WeightsError, load_state_dict_source

    marker = tmp_path / "ran"
    torch.save({"model": {"w": torch.zeros(1)}, "evil": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match=r"weights_only=True\), which runs no code"):
        load_state_dict_source(str(tmp_path / "evil.pth"))
    assert not marker.exists()
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "plain.pth")
    assert load_state_dict_source(str(tmp_path / "plain.pth"))["w"].tolist() == [1.0, 1.0]


@pytest.mark.detectron2
def test_detectron2_loads_a_local_pkl_only_with_trust_pickle_and_a_pth_without_pickle(tmp_path):
    import pickle

    import numpy as np

    from d2retrain.model import d2 as d2_engine
    from d2retrain.model.headsurgery import WeightsError

    spec = model_spec(
        filled("model", {"architecture": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"}),
        "detectron2",
    )
    predictor = d2_engine.Detectron2Predictor(None, spec, 2, device="cpu")
    name, tensor = next(iter(predictor.model.state_dict().items()))
    marker = tmp_path / "ran"
    with open(tmp_path / "weights.pkl", "wb") as handle:
        pickle.dump({"model": {name: np.full(tensor.shape, 0.5, np.float32)}, "__author__": "x"}, handle)
    local = str(tmp_path / "weights.pkl")
    with pytest.raises(WeightsError, match=r"model\.trust_pickle: true"):
        d2_engine.initial_state(
            model_spec(filled("model", {"weights": local}), "detectron2"), ["person"], predictor.model
        )
    trusted = model_spec(filled("model", {"weights": local, "trust_pickle": True}), "detectron2")
    state, _ = d2_engine.initial_state(trusted, ["person"], predictor.model)
    assert float(state[name].flatten()[0]) == 0.5
    torch.save(
        {"model": {name: torch.full(tensor.shape, 0.25)}, "evil": _Payload(marker)}, tmp_path / "w.pth"
    )
    with pytest.raises(WeightsError, match="runs no code"):
        d2_engine.initial_state(
            model_spec(filled("model", {"weights": str(tmp_path / "w.pth")}), "detectron2"),
            ["person"],
            predictor.model,
        )
    assert not marker.exists()
    torch.save({"model": {name: torch.full(tensor.shape, 0.25)}}, tmp_path / "w.pth")
    state, _ = d2_engine.initial_state(
        model_spec(filled("model", {"weights": str(tmp_path / "w.pth")}), "detectron2"),
        ["person"],
        predictor.model,
    )
    assert float(state[name].flatten()[0]) == 0.25


def _torchvision_coco_checkpoint(path) -> dict:
    """A COCO-shaped Mask R-CNN R50-FPN state dict as torchvision publishes its COCO model:
    FrozenBatchNorm buffers (no num_batches_tracked), 91 class rows. Random weights, and norm
    statistics far from 0 and 1, so that live norms would visibly move them."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = MaskRCNN(_resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=91)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    state = model.state_dict()
    torch.save(state, path)
    return state


def _body_trainable(model) -> dict[str, bool]:
    body = model.backbone.body
    return {
        name: any(p.requires_grad for p in getattr(body, name).parameters())
        for name in ("conv1", "layer1", "layer2", "layer3", "layer4")
    }


@pytest.mark.parametrize(
    ("freeze_at", "trainable"),
    [(0, "conv1 layer1 layer2 layer3 layer4"), (2, "layer2 layer3 layer4"), (5, "")],
)
def test_a_torchvision_coco_checkpoint_loads_strictly_with_frozen_norms_and_freeze_at(
    tmp_path, freeze_at, trainable
):
    from torchvision.ops.misc import FrozenBatchNorm2d

    published = _torchvision_coco_checkpoint(tmp_path / "coco.pth")
    assert not [key for key in published if key.endswith("num_batches_tracked")]
    spec = model_spec(
        filled(
            "model",
            {
                "architecture": "maskrcnn_resnet50_fpn",
                "weights": str(tmp_path / "coco.pth"),
                "freeze_at": freeze_at,
            },
        ),
        "torchvision",
    )
    model = tv_engine.build_model(spec, 90, solver_spec(filled("train", TINY)))
    model.load_state_dict(published, strict=True)
    body = model.backbone.body
    assert not [m for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len([m for m in body.modules() if isinstance(m, FrozenBatchNorm2d)]) == 53
    assert {name for name, live in _body_trainable(model).items() if live} == set(trainable.split())
    assert all(p.requires_grad for p in model.roi_heads.parameters())


def test_from_scratch_norms_train_and_nothing_is_frozen():
    spec = model_spec(
        filled("model", {"architecture": "maskrcnn_resnet50_fpn", "weights": "none"}), "torchvision"
    )
    model = tv_engine.build_model(spec, 2, solver_spec(filled("train", TINY)))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())
    assert all(_body_trainable(model).values())


@pytest.mark.slow
def test_fine_tuning_at_a_zero_learning_rate_gives_the_same_predictions_after_1_and_8_iterations(
    mini_split, tmp_path
):
    """Live norms fail this: every batch moves their statistics, whatever the learning rate."""
    from d2retrain.data.images import read_image
    from d2retrain.model.engines import load_predictor

    _, paths = mini_split
    published = _torchvision_coco_checkpoint(tmp_path / "coco.pth")
    model = {
        "engine": "torchvision",
        "architecture": "maskrcnn_resnet50_fpn",
        "weights": str(tmp_path / "coco.pth"),
        "min_size_test": 96,
        "max_size_test": 160,
    }
    sizes = {"min_size_train": [96], "max_size_train": 160}
    train = TINY | sizes | {"base_lr": 1e-12, "warmup_iterations": 0, "steps": [], "checkpoint_period": 100}
    images = [read_image(path) for path in sorted((COCO_MINI / "val2017").glob("*.jpg"))[:4]]
    predictions, finals = [], []
    for iterations in (1, 8):
        folder = tmp_path / f"model_{iterations}"
        train_from_config(model=model, train=train | {"iterations": iterations}, **mini_inputs(paths, folder))
        predictor, _ = load_predictor(folder, device="cpu", score_threshold=0.0)
        predictions.append(predictor.predict_batch(images))
        finals.append(torch.load(folder / "model_final.pth", weights_only=True)["model"])
    for one, eight in zip(*predictions, strict=True):  # the weights that train move by ~1e-12 x grad
        assert len(one) == len(eight) > 0
        assert abs(one.boxes - eight.boxes).max() < 0.01  # pixels
        assert abs(one.scores - eight.scores).max() < 1e-4
    frozen = [
        key
        for key in published
        if key.startswith(("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"))
    ]
    frozen += [key for key in published if key.startswith("backbone.body") and "running_" in key]
    assert len(frozen) > 50
    for key in frozen:
        assert torch.equal(finals[0][key], published[key]) and torch.equal(finals[1][key], published[key]), (
            key
        )


def _coco_shaped_small(path) -> None:
    """The demo network with COCO's 91 rows, saved as base weights."""
    torch.manual_seed(1)
    solver = solver_spec(filled("train", {"min_size_train": [128], "max_size_train": 200}))
    full = tv_engine.build_model(
        model_spec(filled("model", {"architecture": "maskrcnn_resnet18_fpn"}), "torchvision"), 90, solver
    )
    torch.save({"model": full.state_dict()}, path)


@pytest.mark.parametrize(
    ("classes", "aliases", "rows"),
    [
        (["sports ball", "person"], {}, [0, 37, 1]),
        (["ball", "person"], {"ball": "sports ball"}, [0, 37, 1]),
        (["widget", "person"], {}, [0, None, 1]),
    ],
)
def test_head_surgery_finds_coco_rows_by_name_and_leaves_other_classes_at_random(
    tmp_path, classes, aliases, rows
):
    _coco_shaped_small(tmp_path / "coco.pth")
    base = torch.load(tmp_path / "coco.pth", weights_only=True)["model"]
    model = {
        "architecture": "maskrcnn_resnet18_fpn",
        "weights": str(tmp_path / "coco.pth"),
        "coco_names": aliases,
    }
    spec = model_spec(filled("model", model), "torchvision")
    subset = tv_engine.build_model(spec, len(classes), solver_spec(filled("train", TINY)))
    own = {key: value.clone() for key, value in subset.state_dict().items()}
    state, surgery = tv_engine.initial_state(spec, classes, subset)
    assert surgery
    key = "roi_heads.box_predictor.cls_score.weight"
    for place, row in enumerate(rows):
        expected = own[key][place] if row is None else base[key][row]
        assert torch.equal(state[key][place], expected)


def test_classes_that_are_no_coco_category_get_no_surgery_and_an_unknown_alias_is_refused(tmp_path):
    _coco_shaped_small(tmp_path / "coco.pth")
    weights = {"architecture": "maskrcnn_resnet18_fpn", "weights": str(tmp_path / "coco.pth")}
    spec = model_spec(filled("model", weights), "torchvision")
    subset = tv_engine.build_model(spec, 2, solver_spec(filled("train", TINY)))
    _, surgery = tv_engine.initial_state(spec, ["widget", "gizmo"], subset)
    assert not surgery
    with pytest.raises(D2RetrainError, match="not COCO categories"):
        tv_engine.initial_state(
            model_spec(filled("model", weights | {"coco_names": {"widget": "gadget"}}), "torchvision"),
            ["widget"],
            subset,
        )


def _renamed_or_renumbered(source, target, rename=None, shift_ids=False):
    """A copy of a COCO file with categories renamed, or with every category id changed (names kept)."""
    document = json.loads(source.read_text())
    new_id = {c["id"]: (1000 - c["id"] if shift_ids else c["id"]) for c in document["categories"]}
    for category in document["categories"]:
        category["name"] = (rename or {}).get(category["name"], category["name"])
        category["id"] = new_id[category["id"]]
    for annotation in document["annotations"]:
        annotation["category_id"] = new_id[annotation["category_id"]]
    target.write_text(json.dumps(document))
    return target


@pytest.mark.slow
def test_a_source_file_with_other_category_ids_trains_exactly_the_same_model(mini_split, tmp_path):
    _, paths = mini_split
    _coco_shaped_small(tmp_path / "coco.pth")
    source = COCO_MINI / "annotations" / "instances_train2017.json"
    renumbered = _renamed_or_renumbered(source, tmp_path / "renumbered.json", shift_ids=True)
    model = {
        "engine": "torchvision",
        "architecture": "maskrcnn_resnet18_fpn",
        "weights": str(tmp_path / "coco.pth"),
    }
    finals = []
    for name, source_json in (("original", source), ("renumbered", renumbered)):
        folder = tmp_path / name
        inputs = mini_inputs(paths, folder, source_json=str(source_json))
        train_from_config(model=model, train=TINY | {"iterations": 1}, **inputs)
        finals.append(torch.load(folder / "model_final.pth", weights_only=True)["model"])
    renumbered = ModelFolder(tmp_path / "renumbered").read_classes()
    assert renumbered.source_ids == [999, 963]  # classes.json keeps the file's ids
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][key], finals[1][key]) for key in finals[0])


@pytest.mark.slow
def test_classes_named_outside_coco_get_no_baseline(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rename = {"person": "widget", "sports ball": "gizmo"}
    paths = {}
    for split in ("train", "val"):
        source = _renamed_or_renumbered(
            COCO_MINI / "annotations" / f"instances_{split}2017.json", folder / f"{split}_all.json", rename
        )
        filter_file(str(source), str(folder / f"{split}.json"), ["widget", "gizmo"], FilterOptions())
        paths[split] = str(folder / f"{split}.json")
    _coco_shaped_small(tmp_path / "coco.pth")
    model = {
        "engine": "torchvision",
        "architecture": "maskrcnn_resnet18_fpn",
        "weights": str(tmp_path / "coco.pth"),
    }
    inputs = mini_inputs(
        paths, tmp_path / "m", classes=["widget", "gizmo"], source_json=str(folder / "train_all.json")
    )
    train_from_config(model=model, train=TINY | {"iterations": 1}, **inputs)
    reports = evaluate_mini(tmp_path / "m", paths, tmp_path, ["widget", "gizmo"], "e.json", "e.csv")
    assert set(reports) == {"retrained"}


@pytest.mark.detectron2
def test_detectron2_head_surgery_finds_coco_rows_by_name_with_background_last(tmp_path):
    from d2retrain.model import d2 as d2_engine

    spec = model_spec(
        filled("model", {"architecture": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"}),
        "detectron2",
    )
    coco = d2_engine.Detectron2Predictor(None, spec, 80, device="cpu").model.state_dict()
    torch.save(coco, tmp_path / "coco.pth")
    tuned = model_spec(
        filled("model", {"architecture": spec.architecture, "weights": str(tmp_path / "coco.pth")}),
        "detectron2",
    )
    subset = d2_engine.Detectron2Predictor(None, tuned, 2, device="cpu").model
    own = {key: value.clone() for key, value in subset.state_dict().items()}
    state, surgery = d2_engine.initial_state(tuned, ["widget", "sports ball"], subset)
    assert surgery
    scores, masks = "roi_heads.box_predictor.cls_score.weight", "roi_heads.mask_head.predictor.weight"
    ball = d2_engine.COCO_IDS.index(37)
    assert torch.equal(state[scores][0], own[scores][0])  # widget: its own random row
    assert torch.equal(state[scores][1], coco[scores][ball])
    assert torch.equal(state[scores][2], coco[scores][80])  # background, last in detectron2
    assert torch.equal(state[masks][1], coco[masks][ball])
