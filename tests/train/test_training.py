"""Training plumbing and the torchvision engine: schedule, surgery, resume, divergence."""

import json
import logging
from collections import defaultdict

import pytest
import torch
import yaml
from helpers import COCO_MINI
from helpers.training import D2_SMALL, TINY, mini_inputs

from d2retrain.core.errors import D2RetrainError
from d2retrain.data.filtering import FilterOptions
from d2retrain.data.prepare import filter_file
from d2retrain.model import tv as tv_engine
from d2retrain.model.engines import evaluate_model, resolve_engine
from d2retrain.model.folder import ModelFolder
from d2retrain.model.specs import model_spec, solver_spec
from d2retrain.train import tv as tv_train
from d2retrain.train.job import distributed_spec, lr_factor
from d2retrain.train.loop import CheckpointStore, TrainingDivergedError, check_losses, scalar_tag
from d2retrain.train.run import train_from_config


@pytest.mark.parametrize(
    ("iteration", "expected"),
    [(0, 0.001), (50, 0.5005), (100, 1.0), (299, 1.0), (300, 0.1), (370, 0.01), (399, 0.01)],
)
def test_lr_factor_follows_detectron2_warmup_multistep(iteration, expected):
    solver = solver_spec({"warmup_iterations": 100, "steps": [300, 370]})
    assert lr_factor(solver, iteration) == pytest.approx(expected)


@pytest.mark.detectron2
def test_lr_factor_equals_detectron2s_scheduler():
    from detectron2.solver.lr_scheduler import WarmupParamScheduler  # noqa: F401
    from detectron2.solver.lr_scheduler import WarmupParamScheduler as Warmup
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    solver = solver_spec({"warmup_iterations": 100, "steps": [300, 370], "iterations": 400})
    schedule = Warmup(
        MultiStepParamScheduler([1, 0.1, 0.01], milestones=[300, 370], num_updates=400),
        0.001,
        100 / 400,
        "linear",
        rescale_interval=False,
    )
    for iteration in (0, 10, 99, 100, 299, 300, 369, 370, 399):
        assert lr_factor(solver, iteration) == pytest.approx(schedule(iteration / 400), rel=1e-6)


def test_divergence_guard_names_the_iteration_and_the_losses():
    check_losses({"loss_a": 1.0}, 3, 100.0)
    with pytest.raises(TrainingDivergedError, match=r"iteration 7 \(loss_a=nan"):
        check_losses({"loss_a": float("nan")}, 7, 100.0)
    with pytest.raises(TrainingDivergedError):
        check_losses({"loss_a": 1e6}, 7, 100.0)


def test_checkpoints_resume_only_with_the_same_fingerprint_and_only_when_unfinished(tmp_path):
    store = CheckpointStore(tmp_path, "abc")
    store.start_fresh()
    store.save({"model": {"w": torch.ones(1)}}, 10)
    assert store.resumable() == (tmp_path / "model_0000010.pth", 10)
    assert CheckpointStore(tmp_path, "other").resumable() is None
    store.mark_finished(10)
    assert store.resumable() is None
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_engine_is_refused():
    with pytest.raises(D2RetrainError, match="unknown"):
        resolve_engine("caffe2")
    assert resolve_engine("auto", "maskrcnn_resnet50_fpn") == "torchvision"


def test_head_surgery_keeps_the_chosen_classes_outputs_exactly(tmp_path):
    torch.manual_seed(0)
    solver = solver_spec({"min_size_train": [128], "max_size_train": 200})
    full_spec = model_spec({"architecture": "maskrcnn_resnet18_fpn"}, "torchvision")
    full = tv_engine.build_model(full_spec, 90, solver).eval()  # 91 rows: a COCO-shaped model
    torch.save({"model": full.state_dict()}, tmp_path / "coco.pth")
    ids = [37, 1]  # sports ball, person: the rows head surgery must pick, by name
    spec = model_spec(
        {"architecture": "maskrcnn_resnet18_fpn", "weights": str(tmp_path / "coco.pth")}, "torchvision"
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


def evaluate_mini(model_dir, paths: dict, folder, classes: list[str], metrics: str, per_class: str) -> dict:
    """Evaluate a model folder on the filtered coco-mini val split, writing into ``folder``."""
    return evaluate_model(
        str(model_dir),
        paths["val"],
        str(COCO_MINI / "val2017"),
        classes,
        str(folder / metrics),
        str(folder / per_class),
        device="cpu",
    )


def assert_tensorboard_shows_the_metrics(model_dir) -> dict[str, list]:
    """The event files under ``model_dir/tensorboard`` hold exactly the scalars of ``metrics.jsonl``
    (each iteration once, even after a resume); returns them by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(model_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    shown = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected = defaultdict(list)
    for line in (model_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "iteration":
                expected[scalar_tag(key)].append((record["iteration"], pytest.approx(value, rel=1e-6)))
    assert shown == expected
    return shown


def _train_mini(folder, paths, output, **train) -> None:
    model = {"engine": "torchvision", "architecture": "maskrcnn_resnet18_fpn"}
    train_from_config(model=model, train=TINY | train, **mini_inputs(paths, output))


def test_torchvision_engine_trains_and_evaluates_on_coco_mini_from_scratch(mini_split, tmp_path, caplog):
    folder, paths = mini_split
    with caplog.at_level(logging.INFO):
        _train_mini(folder, paths, tmp_path / "model", eval_period=2, keep_checkpoints=1)
    model = tmp_path / "model"
    progress = [r.getMessage() for r in caplog.records if r.name == "d2retrain.train.progress"]
    assert progress[-2].startswith("iteration 4/4  total_loss: ") and progress[-2].endswith("eta: 0:00:00")
    assert progress[-1].startswith("evaluation at iteration 4/4: segm AP ")  # one line per evaluation
    assert [p.name for p in (model / "checkpoints").glob("model_*.pth")] == ["model_0000004.pth"]  # keep 1
    for name in ("model.pth", "model_final.pth", "classes.json", "config.yaml", "metrics.jsonl", "loss.png"):
        assert (model / name).is_file(), name
    info = ModelFolder(model).read_classes(["person", "sports ball"])
    assert info.source_ids == [1, 37] and info.engine == "torchvision"
    lines = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "total_loss" in line]
    assert [line["iteration"] for line in steps] == [1, 2, 3, 4]
    assert {"total_loss", "loss_mask", "lr", "time", "data_time"} <= set(steps[0])
    evals = [line for line in lines if "segm_AP" in line]  # train.eval_period = 2
    assert [line["iteration"] for line in evals] == [2, 4]
    assert all(0 <= line["bbox_AP"] <= 1 and 0 <= line["segm_AP50"] <= 1 for line in evals)
    scalars = assert_tensorboard_shows_the_metrics(model)
    assert {"loss/total_loss", "loss/loss_mask", "lr", "val/segm_AP", "time/iteration"} <= set(scalars)
    reports = evaluate_mini(model, paths, tmp_path, info.classes, "m.json", "c.csv")
    assert set(reports["retrained"]["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert "sports ball" in (tmp_path / "c.csv").read_text()


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(mini_split, tmp_path, monkeypatch, caplog):
    folder, paths = mini_split
    real_step = tv_train._step
    calls = {"n": 0}

    def dying_step(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed during iteration 3, after the checkpoint at 2
        return real_step(*args)

    monkeypatch.setattr(tv_train, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        _train_mini(folder, paths, tmp_path / "model", eval_period=2)
    assert not (tmp_path / "model" / "model_final.pth").exists()
    monkeypatch.setattr(tv_train, "_step", real_step)
    with caplog.at_level(logging.INFO):
        _train_mini(folder, paths, tmp_path / "model", eval_period=2)
    assert "at iteration 2" in caplog.text
    lines = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    # the evaluation after iteration 2 survives the kill; nothing is logged twice
    assert [(line["iteration"], "segm_AP" in line) for line in lines] == [
        (1, False),
        (2, False),
        (2, True),
        (3, False),
        (4, False),
        (4, True),
    ]
    assert_tensorboard_shows_the_metrics(tmp_path / "model")  # iterations 2 and 3 once each
    caplog.clear()
    with caplog.at_level(logging.INFO):  # a finished run is not resumed: a forced rerun starts fresh
        _train_mini(folder, paths, tmp_path / "model", eval_period=2)
    assert "finished: starting fresh" in caplog.text


def test_a_diverging_run_stops_with_a_clear_error(mini_split, tmp_path):
    folder, paths = mini_split
    with pytest.raises(TrainingDivergedError, match="diverged"):
        _train_mini(folder, paths, tmp_path / "model", base_lr=1e6, warmup_iterations=0, max_loss=50)


def test_missing_images_are_listed_before_training(mini_split, tmp_path):
    _, paths = mini_split
    with pytest.raises(D2RetrainError, match=r"images of .* are missing"):
        inputs = mini_inputs(paths, tmp_path / "m", train_images=str(tmp_path), val_images=str(tmp_path))
        train_from_config(model={"architecture": "maskrcnn_resnet18_fpn"}, train=TINY, **inputs)


@pytest.mark.detectron2
def test_detectron2_engine_trains_resumes_and_evaluates_on_coco_mini(mini_split, tmp_path, caplog):
    _, paths = mini_split
    common = mini_inputs(paths, tmp_path / "model")
    model = D2_SMALL
    train = TINY | {"base_lr": 1e-5, "max_loss": 1e5, "eval_period": 2}
    train_from_config(model=model, train=train, **common)
    info = ModelFolder(tmp_path / "model").read_classes(["person", "sports ball"])
    assert info.engine == "detectron2" and info.source_ids == [1, 37]
    lines = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines if "total_loss" in line] == [1, 2, 3, 4]
    assert [line["iteration"] for line in lines if "segm_AP" in line] == [2, 4]
    assert lines[0]["lr"] == pytest.approx(1e-5 * 0.001)
    assert {"loss/loss_mask", "val/segm_AP"} <= set(assert_tensorboard_shows_the_metrics(tmp_path / "model"))
    reports = evaluate_mini(tmp_path / "model", paths, tmp_path, info.classes, "m.json", "c.csv")
    assert set(reports["retrained"]["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    state = json.loads((tmp_path / "model" / "checkpoints" / "state.json").read_text())
    assert state["finished"] and state["iteration"] == 4


@pytest.mark.detectron2
def test_detectron2_rejects_an_unknown_model_zoo_name(mini_split, tmp_path):
    _, paths = mini_split
    with pytest.raises(D2RetrainError, match="model-zoo name"):
        model = {"engine": "detectron2", "architecture": "COCO-InstanceSegmentation/nope.yaml"}
        train_from_config(model=model, train=TINY, **mini_inputs(paths, tmp_path / "m"))


@pytest.mark.slow
def test_coco_base_weights_give_a_baseline_beside_the_retrained_model(mini_split, tmp_path):
    _, paths = mini_split
    solver = solver_spec({"min_size_train": [128], "max_size_train": 200})
    coco_shaped = tv_engine.build_model(
        model_spec({"architecture": "maskrcnn_resnet18_fpn"}, "torchvision"), 90, solver
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


def test_a_class_list_not_matching_the_annotations_is_refused(mini_split, tmp_path):
    _, paths = mini_split
    for classes, words in (
        (["sports ball", "person"], "not the class list"),
        (["person", "kite"], "not the class"),
    ):
        with pytest.raises(D2RetrainError, match=words):
            train_from_config(model={}, train=TINY, **mini_inputs(paths, tmp_path / "m", classes=classes))
    assert not (tmp_path / "m").exists()


@pytest.fixture
def job_log(tmp_path):
    """A file handler on the root logger, as a workflow job has: training processes log to it."""
    path = tmp_path / "train.log"
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield path
    root.removeHandler(handler)
    root.setLevel(level)
    handler.close()


@pytest.mark.slow
def test_two_gloo_processes_train_in_step_and_write_one_checkpoint(mini_split, tmp_path, job_log):
    folder, paths = mini_split
    _train_mini(folder, paths, tmp_path / "model", num_gpus=2, eval_period=2)
    log = job_log.read_text()
    assert "starting 2 training processes (machine 0 of 1, 2 in all)" in log
    assert "[rank 1] d2retrain" in log  # the second process logs to the job's log, tagged
    assert "weights identical on all 2 processes" in log
    model = tmp_path / "model"
    lines = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    # rank 0 alone logs: each iteration once, losses averaged over both processes
    assert [line["iteration"] for line in lines if "total_loss" in line] == [1, 2, 3, 4]
    assert [line["iteration"] for line in lines if "segm_AP" in line] == [2, 4]
    checkpoints = sorted(path.name for path in (model / "checkpoints").iterdir())
    best = json.loads((model / "best.json").read_text())["iteration"]
    assert checkpoints == [
        f"best_{best:07d}.pth",
        "metrics.jsonl",
        "model_0000002.pth",
        "model_0000004.pth",
        "state.json",
    ]
    assert log.count("checkpoint at iteration 2:") == 1 and log.count("best so far: segm_AP") in (1, 2)
    state = torch.load(model / "model_final.pth", weights_only=True)["model"]
    assert not any(key.startswith("module.") for key in state)  # the bare network, loadable alone
    assert ModelFolder(model).read_classes().engine == "torchvision"


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_on_one_process(mini_split, tmp_path, job_log):
    """The process count is not part of the fingerprint: a run killed on 2 GPUs may resume on 1."""
    folder, paths = mini_split
    _train_mini(folder, paths, tmp_path / "model", num_gpus=2)
    store = tmp_path / "model" / "checkpoints" / "state.json"
    state = json.loads(store.read_text())  # as if killed after the checkpoint at iteration 2:
    killed = {"checkpoint": "model_0000002.pth", "iteration": 2, "finished": False}
    store.write_text(json.dumps(state | killed))
    _train_mini(folder, paths, tmp_path / "model")
    assert "model_0000002.pth at iteration 2" in job_log.read_text()
    lines = (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("launch", "words"),
    [
        ({"num_gpus": 3}, "does not split evenly over 3 processes"),
        ({"num_machines": 2, "machine_rank": 2, "dist_url": "tcp://h:1"}, "machine_rank 2 is not in 0..1"),
        ({"num_machines": 2}, "dist_url must name machine 0"),
    ],
)
def test_impossible_launches_are_refused_before_training(launch, words, mini_split, tmp_path):
    folder, paths = mini_split
    with pytest.raises(D2RetrainError, match=words):
        _train_mini(folder, paths, tmp_path / "model", **launch)
    assert not (tmp_path / "model").exists()


def test_machine_rank_minus_one_comes_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert distributed_spec({"num_machines": 2, "machine_rank": -1}).machine_rank == 1
    monkeypatch.delenv("SLURM_NODEID")
    with pytest.raises(D2RetrainError, match="SLURM_NODEID is not set"):
        distributed_spec({"machine_rank": -1})


@pytest.mark.detectron2
def test_detectron2_refuses_several_processes_without_gpus(mini_split, tmp_path):
    _, paths = mini_split
    model = {"engine": "detectron2", "architecture": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"}
    with pytest.raises(D2RetrainError, match="several processes on GPUs only"):
        train_from_config(model=model, train=TINY | {"num_gpus": 2}, **mini_inputs(paths, tmp_path / "m"))


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

    spec = model_spec({"architecture": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"}, "detectron2")
    predictor = d2_engine.Detectron2Predictor(None, spec, solver_spec(TINY), 2, device="cpu")
    name, tensor = next(iter(predictor.model.state_dict().items()))
    marker = tmp_path / "ran"
    with open(tmp_path / "weights.pkl", "wb") as handle:
        pickle.dump({"model": {name: np.full(tensor.shape, 0.5, np.float32)}, "__author__": "x"}, handle)
    local = str(tmp_path / "weights.pkl")
    with pytest.raises(WeightsError, match=r"model\.trust_pickle: true"):
        d2_engine.initial_state(model_spec({"weights": local}, "detectron2"), ["person"], predictor.model)
    trusted = model_spec({"weights": local, "trust_pickle": True}, "detectron2")
    state, _ = d2_engine.initial_state(trusted, ["person"], predictor.model)
    assert float(state[name].flatten()[0]) == 0.5
    torch.save(
        {"model": {name: torch.full(tensor.shape, 0.25)}, "evil": _Payload(marker)}, tmp_path / "w.pth"
    )
    with pytest.raises(WeightsError, match="runs no code"):
        d2_engine.initial_state(
            model_spec({"weights": str(tmp_path / "w.pth")}, "detectron2"), ["person"], predictor.model
        )
    assert not marker.exists()
    torch.save({"model": {name: torch.full(tensor.shape, 0.25)}}, tmp_path / "w.pth")
    state, _ = d2_engine.initial_state(
        model_spec({"weights": str(tmp_path / "w.pth")}, "detectron2"), ["person"], predictor.model
    )
    assert float(state[name].flatten()[0]) == 0.25


def test_a_model_folder_written_before_newer_keys_still_loads(tmp_path):
    from d2retrain.model.engines import read_model_config

    solver = {k: v for k, v in TINY.items() if k not in ("device", "eval_period")}
    record = {"model": {"engine": "torchvision", "architecture": "maskrcnn_resnet18_fpn", "weights": "none"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(record | {"solver": solver}))
    model, loaded = read_model_config(tmp_path)
    assert (model.engine, model.trust_pickle, model.head_surgery) == ("torchvision", False, True)
    assert (loaded.iterations, loaded.eval_period, loaded.clip_gradients) == (4, 200, 1.0)


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
        {
            "architecture": "maskrcnn_resnet50_fpn",
            "weights": str(tmp_path / "coco.pth"),
            "freeze_at": freeze_at,
        },
        "torchvision",
    )
    model = tv_engine.build_model(spec, 90, solver_spec(TINY))
    model.load_state_dict(published, strict=True)
    body = model.backbone.body
    assert not [m for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len([m for m in body.modules() if isinstance(m, FrozenBatchNorm2d)]) == 53
    assert {name for name, live in _body_trainable(model).items() if live} == set(trainable.split())
    assert all(p.requires_grad for p in model.roi_heads.parameters())


def test_from_scratch_norms_train_and_nothing_is_frozen():
    spec = model_spec({"architecture": "maskrcnn_resnet50_fpn", "weights": "none"}, "torchvision")
    model = tv_engine.build_model(spec, 2, solver_spec(TINY))
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
    }
    sizes = {"min_size_train": [96], "max_size_train": 160, "min_size_test": 96, "max_size_test": 160}
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
    solver = solver_spec({"min_size_train": [128], "max_size_train": 200})
    full = tv_engine.build_model(
        model_spec({"architecture": "maskrcnn_resnet18_fpn"}, "torchvision"), 90, solver
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
    spec = model_spec(model, "torchvision")
    subset = tv_engine.build_model(spec, len(classes), solver_spec(TINY))
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
    spec = model_spec(weights, "torchvision")
    subset = tv_engine.build_model(spec, 2, solver_spec(TINY))
    _, surgery = tv_engine.initial_state(spec, ["widget", "gizmo"], subset)
    assert not surgery
    with pytest.raises(D2RetrainError, match="not COCO categories"):
        tv_engine.initial_state(
            model_spec(weights | {"coco_names": {"widget": "gadget"}}, "torchvision"), ["widget"], subset
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

    spec = model_spec({"architecture": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"}, "detectron2")
    coco = d2_engine.Detectron2Predictor(None, spec, solver_spec(TINY), 80, device="cpu").model.state_dict()
    torch.save(coco, tmp_path / "coco.pth")
    tuned = model_spec(
        {"architecture": spec.architecture, "weights": str(tmp_path / "coco.pth")}, "detectron2"
    )
    subset = d2_engine.Detectron2Predictor(None, tuned, solver_spec(TINY), 2, device="cpu").model
    own = {key: value.clone() for key, value in subset.state_dict().items()}
    state, surgery = d2_engine.initial_state(tuned, ["widget", "sports ball"], subset)
    assert surgery
    scores, masks = "roi_heads.box_predictor.cls_score.weight", "roi_heads.mask_head.predictor.weight"
    ball = d2_engine.COCO_IDS.index(37)
    assert torch.equal(state[scores][0], own[scores][0])  # widget: its own random row
    assert torch.equal(state[scores][1], coco[scores][ball])
    assert torch.equal(state[scores][2], coco[scores][80])  # background, last in detectron2
    assert torch.equal(state[masks][1], coco[masks][ball])


def write_negatives_case(folder) -> str:
    """Four 64x48 images: 1 and 4 with a person, 2 without any annotation (a negative), 3 with a
    crowd annotation only (objects are there: not a negative)."""
    import cv2
    import numpy as np

    images = []
    for index in range(1, 5):
        cv2.imwrite(str(folder / f"{index}.png"), np.full((48, 64, 3), 40 * index, np.uint8))
        images.append({"id": index, "file_name": f"{index}.png", "height": 48, "width": 64})
    person = {"category_id": 1, "iscrowd": 0, "area": 400.0, "bbox": [10.0, 10.0, 20.0, 20.0]}
    person["segmentation"] = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    crowd = person | {"iscrowd": 1, "segmentation": {"size": [48, 64], "counts": [500, 20, 2552]}}
    annotations = [person | {"id": 1, "image_id": 1}, crowd | {"id": 2, "image_id": 3}]
    annotations.append(person | {"id": 3, "image_id": 4})
    document = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}
    path = folder / "train.json"
    path.write_text(json.dumps(document))
    return str(path)


def test_negatives_train_and_crowd_only_images_do_not(tmp_path, caplog):
    from d2retrain.data.records import load_records
    from d2retrain.train.samples import TrainSamples

    records = load_records(write_negatives_case(tmp_path), str(tmp_path))
    with caplog.at_level(logging.INFO):
        samples = TrainSamples(records, seed=0, flip=True)
    assert sorted(record.image_id for record in samples.records) == [1, 2, 4]
    assert "1 images without annotations (negatives)" in caplog.text
    assert "1 with only crowd or unusable annotations left out" in caplog.text
    served = {samples.records[samples.index_at(p)].image_id: samples[p] for p in range(3)}
    image, target = served[2]
    assert image.shape == (3, 48, 64)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 48, 64) and target["masks"].dtype == torch.uint8
    assert served[1][1]["masks"].sum() == 400  # an image with an instance keeps its mask


def test_a_batch_of_only_negatives_gives_a_finite_loss_and_gradients():
    torch.manual_seed(0)
    spec = model_spec({"architecture": "maskrcnn_resnet18_fpn"}, "torchvision")
    model = tv_engine.build_model(spec, 2, solver_spec(TINY))
    model.train()
    empty = {
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "masks": torch.zeros((0, 96, 128), dtype=torch.uint8),
    }
    losses = model([torch.rand(3, 96, 128), torch.rand(3, 96, 128)], [empty, empty])
    assert all(torch.isfinite(value) for value in losses.values()), losses
    assert losses["loss_objectness"] > 0 and losses["loss_classifier"] > 0  # background is learnt
    sum(losses.values()).backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)


@pytest.mark.slow
def test_keep_empty_images_trains_on_the_negatives_of_coco_mini(tmp_path, caplog):
    """The filter's keep_empty_images writes the images without a chosen category; training
    counts and uses them (and without the option, there are none)."""
    from d2retrain.data.instances import read_instances

    paths = {}
    for split in ("train", "val"):
        source = COCO_MINI / "annotations" / f"instances_{split}2017.json"
        paths[split] = str(tmp_path / f"{split}.json")
        filter_file(
            str(source), paths[split], ["sports ball"], FilterOptions(keep_empty_images=split == "train")
        )
    document = read_instances(paths["train"])
    negatives = len({i.id for i in document.images} - {a.image_id for a in document.annotations})
    assert negatives > 0
    inputs = mini_inputs(paths, tmp_path / "model", classes=["sports ball"])
    model = {"engine": "torchvision", "architecture": "maskrcnn_resnet18_fpn"}
    with caplog.at_level(logging.INFO):
        train_from_config(model=model, train=TINY | {"iterations": 2}, **inputs)
    assert f"{negatives} images without annotations (negatives)" in caplog.text
    assert (tmp_path / "model" / "model_final.pth").is_file()


@pytest.mark.detectron2
def test_detectron2_trains_on_the_same_images_negatives_included(tmp_path, caplog):
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model as build_detectron2_model

    from d2retrain.model.d2 import build_config

    train_json = write_negatives_case(tmp_path)
    model = D2_SMALL
    train = TINY | {
        "iterations": 2,
        "base_lr": 1e-5,
        "max_loss": 1e5,
        "min_size_train": [48],
        "min_size_test": 48,
    }
    inputs = {
        "classes": ["person"],
        "train_json": train_json,
        "train_images": str(tmp_path),
        "val_json": train_json,
        "val_images": str(tmp_path),
        "source_json": train_json,
        "output_dir": str(tmp_path / "model"),
        "threads": 2,
    }
    with caplog.at_level(logging.INFO):
        train_from_config(model=model, train=train, **inputs)
    assert "1 images without annotations (negatives)" in caplog.text
    state = json.loads((tmp_path / "model" / "checkpoints" / "state.json").read_text())
    name = f"d2retrain_{state['fingerprint']}_train"  # other tests of this process register theirs
    trained = {d["image_id"]: d["annotations"] for d in DatasetCatalog.get(name)}
    assert sorted(trained) == [1, 2, 4] and trained[2] == []  # as the torchvision engine trains
    DatasetCatalog.remove(name)

    cfg = build_config(model_spec(model, "detectron2"), solver_spec(train), 1, "cpu")
    network = build_detectron2_model(cfg)
    network.train()
    from detectron2.structures import Boxes, Instances

    batch = [
        {
            "image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8).float(),
            "instances": Instances((64, 96)),
        }
        for _ in range(2)
    ]
    for item in batch:
        item["instances"].gt_boxes = Boxes(torch.zeros((0, 4)))
        item["instances"].gt_classes = torch.zeros((0,), dtype=torch.int64)
    from detectron2.utils.events import EventStorage

    with EventStorage(0):  # detectron2's training forward logs into one
        losses = network(batch)
    assert all(torch.isfinite(value) for value in losses.values()), losses


def scripted_evaluations(monkeypatch, values: dict[int, float]) -> dict[int, dict]:
    """The torchvision engine's evaluations during training give ``values[iteration]`` as segm AP
    (the real evaluation's reproduction is checked on the main job, tests/test_workflow.py); the
    weights each was given are returned by iteration."""
    seen: dict[int, dict] = {}

    def evaluate_now(job, run, iteration):
        seen[iteration] = {k: v.clone() for k, v in run.model.state_dict().items()}
        return {"iteration": iteration, "segm_AP": values[iteration], "bbox_AP": 0.0}

    monkeypatch.setattr(tv_train, "_evaluate_now", evaluate_now)
    return seen


def same_weights(path, state: dict) -> bool:
    saved = torch.load(path, weights_only=True)["model"]
    return saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


@pytest.mark.slow
def test_the_best_evaluation_is_kept_served_and_survives_a_kill(mini_split, tmp_path, monkeypatch):
    folder, paths = mini_split
    values = {2: 0.1, 4: 0.3, 6: 0.2, 8: 0.25}
    seen = scripted_evaluations(monkeypatch, values)
    train = {"iterations": 8, "eval_period": 2, "checkpoint_period": 2, "steps": []}
    _train_mini(folder, paths, tmp_path / "whole", **train)
    whole = tmp_path / "whole"
    best = json.loads((whole / "best.json").read_text())
    assert best == {
        "iteration": 4,
        "metric": "segm_AP",
        "value": 0.3,
        "final_iteration": 8,
        "kept": "model_best.pth",
        "served": "model.pth",
    }
    assert same_weights(whole / "model_best.pth", seen[4])  # the evaluated weights, not later ones
    assert same_weights(whole / "model_final.pth", {k: v for k, v in seen[8].items()})
    assert ModelFolder(whole).read_classes().model_file == "model_best.pth"
    assert ModelFolder(whole).served_weights() == whole / "model.pth"
    assert (whole / "model.pth").read_bytes() == (whole / "model_best.pth").read_bytes()
    assert [p.name for p in (whole / "checkpoints").glob("best_*.pth")] == ["best_0000004.pth"]

    real_step, calls = tv_train._step, {"n": 0}

    def dying_step(*args):
        calls["n"] += 1
        if calls["n"] == 6:  # killed during the 6th iteration: the checkpoint at 4 holds best = 4
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(tv_train, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        _train_mini(folder, paths, tmp_path / "killed", **train)
    monkeypatch.setattr(tv_train, "_step", real_step)
    _train_mini(folder, paths, tmp_path / "killed", **train)
    killed = tmp_path / "killed"
    assert json.loads((killed / "best.json").read_text()) == best
    assert (killed / "model_best.pth").read_bytes() == (whole / "model_best.pth").read_bytes()


@pytest.mark.slow
def test_patience_stops_training_after_evaluations_without_improvement(
    mini_split, tmp_path, monkeypatch, caplog
):
    folder, paths = mini_split
    scripted_evaluations(monkeypatch, {2: 0.1, 4: 0.3, 6: 0.2, 8: 0.25, 10: 0.9, 12: 0.95})
    train = {"iterations": 12, "eval_period": 2, "checkpoint_period": 4, "steps": [], "patience": 2}
    with caplog.at_level(logging.INFO):
        _train_mini(folder, paths, tmp_path / "model", **train)
    assert (
        "stopping early after iteration 8: 2 evaluations without a better segm_AP than 0.3000" in caplog.text
    )
    lines = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines if "total_loss" in line] == list(range(1, 9))
    state = json.loads((tmp_path / "model" / "checkpoints" / "state.json").read_text())
    assert state["finished"] and state["iteration"] == 8
    assert json.loads((tmp_path / "model" / "best.json").read_text())["final_iteration"] == 8


@pytest.mark.slow
def test_keep_final_or_no_evaluation_serves_the_last_weights(mini_split, tmp_path, monkeypatch):
    folder, paths = mini_split
    scripted_evaluations(monkeypatch, {2: 0.5, 4: 0.1})
    _train_mini(folder, paths, tmp_path / "final", eval_period=2, keep="final")
    assert ModelFolder(tmp_path / "final").read_classes().model_file == "model_final.pth"
    served = (tmp_path / "final" / "model.pth").read_bytes()
    assert served == (tmp_path / "final" / "model_final.pth").read_bytes()
    assert served != (tmp_path / "final" / "model_best.pth").read_bytes()
    best = json.loads((tmp_path / "final" / "best.json").read_text())
    assert (best["iteration"], best["kept"]) == (2, "model_final.pth")  # described, not served
    _train_mini(folder, paths, tmp_path / "none")  # TINY: eval_period 0
    assert ModelFolder(tmp_path / "none").read_classes().model_file == "model_final.pth"
    assert json.loads((tmp_path / "none" / "best.json").read_text())["iteration"] is None
    assert not (tmp_path / "none" / "model_best.pth").exists()


@pytest.mark.detectron2
def test_detectron2_keeps_the_best_evaluation_and_stops_with_patience(
    mini_split, tmp_path, monkeypatch, caplog
):
    from d2retrain.train import d2 as d2_train

    _, paths = mini_split
    seen: dict[int, dict] = {}

    def evaluate_now(trainer):
        weights = d2_train._bare(trainer.model).state_dict()
        seen[trainer.iter + 1] = {k: v.clone() for k, v in weights.items()}
        return {
            "iteration": trainer.iter + 1,
            "segm_AP": {2: 0.2, 4: 0.1, 6: 0.05, 8: 0.9}[trainer.iter + 1],
            "bbox_AP": 0,
        }

    monkeypatch.setattr(d2_train, "_evaluate_now", evaluate_now)
    model = D2_SMALL
    train = TINY | {
        "iterations": 8,
        "base_lr": 1e-5,
        "max_loss": 1e5,
        "eval_period": 2,
        "patience": 2,
        "steps": [],
    }
    with caplog.at_level(logging.INFO):
        train_from_config(model=model, train=train, **mini_inputs(paths, tmp_path / "model"))
    output = tmp_path / "model"
    assert "stopping early after iteration 6" in caplog.text
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines if "total_loss" in line] == list(range(1, 7))
    best = json.loads((output / "best.json").read_text())
    assert (best["iteration"], best["value"], best["final_iteration"]) == (2, 0.2, 6)
    assert ModelFolder(output).read_classes().model_file == "model_best.pth"
    assert (output / "model.pth").read_bytes() == (output / "model_best.pth").read_bytes()
    assert same_weights(output / "model_best.pth", seen[2])
    assert same_weights(output / "model_final.pth", seen[5])
