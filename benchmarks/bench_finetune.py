"""Fine-tuning from a COCO-shaped start: frozen vs live norms, with and without negatives.

COCO's published weights cannot be downloaded on an offline machine, so the start is made here, the
way torchvision lays out its COCO model: the demo network (ResNet-18 FPN) is pretrained on the demo's
three categories (person, car, sports ball, all COCO names) for ``--pretrain`` iterations, then saved
with 91 class rows (each class at its COCO category id, the other rows at random) and without
``num_batches_tracked`` (FrozenBatchNorm buffers). From that same file, each dataset (the demo, and
``tests/assets/coco-mini``: real photos) is fine-tuned to ``person, sports ball`` for
``--iterations`` iterations four ways:

- norms ``frozen``: the workflow (FrozenBatchNorm2d, ``model.freeze_at: 2``);
- norms ``live``: the engine before this was fixed (BatchNorm2d trained on batches of 2, every stage
  trainable), by replacing the engine's ``freeze_backbone`` with nothing;
- negatives ``yes``: the filter's ``keep_empty_images: true`` (images without the classes train as
  background), ``no``: the default.

It prints the mean total loss over quarters of the run and the val segm/bbox AP at the end, side by
side, and with ``--plot PNG`` the loss curves. The AP of a start pretrained for minutes on synthetic
shapes is small on real photos: read the coco-mini rows as a comparison between the four ways, not
as what COCO's weights would reach.

Usage: python benchmarks/bench_finetune.py [--iterations 100] [--pretrain 300] [--plot finetune.png]
"""

import argparse
import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from d2retrain.core.config import with_defaults
from d2retrain.data.demo import write_demo_dataset
from d2retrain.data.filtering import FilterOptions
from d2retrain.data.prepare import filter_file
from d2retrain.model import tv as tv_engine
from d2retrain.model.folder import ModelFolder
from d2retrain.model.specs import model_spec, solver_spec
from d2retrain.train.run import train_from_config

logger = logging.getLogger("bench_finetune")

__all__ = ["coco_shaped_start", "finetune", "main"]

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO / "tests" / "assets" / "coco-mini"
PRETRAIN_CLASSES = ["person", "car", "sports ball"]
CLASSES = ["person", "sports ball"]
ARCHITECTURE = {"engine": "torchvision", "architecture": "maskrcnn_resnet18_fpn"}
COCO_ROWS = 91
SMOOTHING = 10  # iterations averaged by the plotted loss curves


def _filtered(source: Path, output: Path, classes: list[str], negatives: bool) -> str:
    filter_file(str(source), str(output), classes, FilterOptions(keep_empty_images=negatives))
    return str(output)


def coco_shaped_start(demo, folder: Path, iterations: int) -> Path:
    """Pretrain the demo network on the demo's three COCO categories and save it as torchvision
    saves its COCO model: 91 rows indexed by COCO category id, no ``num_batches_tracked``."""
    paths = {
        split: _filtered(demo.annotations(split), folder / f"pretrain_{split}.json", PRETRAIN_CLASSES, False)
        for split in ("train", "val")
    }
    train = {"iterations": iterations, "eval_period": 0, "checkpoint_period": iterations, "device": "cpu"}
    train |= {"steps": [int(iterations * 0.8)], "warmup_iterations": min(50, iterations // 4)}
    train_from_config(
        model=ARCHITECTURE,
        train=train,
        classes=PRETRAIN_CLASSES,
        train_json=paths["train"],
        train_images=str(demo.images("train")),
        val_json=paths["val"],
        val_images=str(demo.images("val")),
        source_json=str(demo.annotations("train")),
        output_dir=str(folder / "pretrained"),
        threads=torch.get_num_threads(),
    )
    trained = torch.load(folder / "pretrained" / "model_final.pth", weights_only=True)["model"]
    coco_ids = ModelFolder(folder / "pretrained").read_classes().source_ids  # person 1, car 3, sports ball 37
    torch.manual_seed(0)
    config = with_defaults({"model": ARCHITECTURE})
    solver = solver_spec(config["train"])
    full = tv_engine.build_model(
        model_spec(config["model"], "torchvision"), COCO_ROWS - 1, solver
    ).state_dict()
    state = {}
    for key, value in trained.items():
        if key.endswith("num_batches_tracked"):
            continue  # torchvision's COCO checkpoints hold FrozenBatchNorm2d buffers only
        layer = key.rsplit(".", 1)[0]
        if layer in tv_engine.HEAD_LAYERS:
            rows = tv_engine.HEAD_LAYERS[layer]
            expanded = full[key].clone()
            for index, coco_id in enumerate([0, *coco_ids]):  # background stays row 0
                expanded[coco_id * rows : (coco_id + 1) * rows] = value[index * rows : (index + 1) * rows]
            value = expanded
        state[key] = value
    path = folder / "coco_shaped.pth"
    torch.save(state, path)
    return path


@contextlib.contextmanager
def _norms(kind: str) -> Iterator[None]:
    """``live``: the engine's fine-tuning setup switched off (BatchNorm2d, every stage trained)."""
    if kind == "frozen":
        yield
        return
    real = tv_engine.freeze_backbone
    tv_engine.freeze_backbone = lambda body, freeze_at: None
    try:
        yield
    finally:
        tv_engine.freeze_backbone = real


def finetune(data: dict, weights: Path, output: Path, iterations: int, norms: str) -> dict:
    """Fine-tune from ``weights`` and return the loss curve, the final val AP and the seconds."""
    train = {
        "iterations": iterations,
        "eval_period": iterations,
        "checkpoint_period": iterations,
        "warmup_iterations": min(20, iterations // 5),
        "steps": [],
        "base_lr": 0.01,
        "device": "cpu",
    }
    start = time.perf_counter()
    with _norms(norms):
        train_from_config(
            model=ARCHITECTURE | {"weights": str(weights)},
            train=train,
            classes=CLASSES,
            output_dir=str(output),
            threads=torch.get_num_threads(),
            **data,
        )
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    final = [r for r in records if "segm_AP" in r][-1]
    return {"losses": losses, "segm_AP": final["segm_AP"], "bbox_AP": final["bbox_AP"], "seconds": seconds}


def _quarters(losses: list[float]) -> list[float]:
    size = max(1, len(losses) // 4)
    parts = (losses[i : i + size] for i in range(0, size * 4, size))
    return [sum(part) / len(part) for part in parts if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=100, help="fine-tuning iterations per run")
    parser.add_argument("--pretrain", type=int, default=300, help="iterations making the COCO-shaped start")
    parser.add_argument("--plot", type=Path, help="write the loss curves to this PNG")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        demo = write_demo_dataset(folder / "demo")
        clock = time.perf_counter()
        weights = coco_shaped_start(demo, folder, args.pretrain)
        seconds = time.perf_counter() - clock
        print(f"COCO-shaped start: {args.pretrain} iterations on the demo in {seconds:.0f} s")
        sources = {
            "demo": (
                demo.annotations("train"),
                demo.images("train"),
                demo.annotations("val"),
                demo.images("val"),
            ),
            "coco-mini": (
                COCO_MINI / "annotations/instances_train2017.json",
                COCO_MINI / "train2017",
                COCO_MINI / "annotations/instances_val2017.json",
                COCO_MINI / "val2017",
            ),
        }
        results = {}
        for dataset, (train_json, train_images, val_json, val_images) in sources.items():
            for negatives in (False, True):
                tag = f"{dataset}_{'neg' if negatives else 'pos'}"
                data = {
                    "train_json": _filtered(train_json, folder / f"{tag}_train.json", CLASSES, negatives),
                    "train_images": str(train_images),
                    "val_json": _filtered(val_json, folder / f"{tag}_val.json", CLASSES, False),
                    "val_images": str(val_images),
                    "source_json": str(train_json),
                }
                images = len(json.loads(Path(data["train_json"]).read_text())["images"])
                for norms in ("frozen", "live"):
                    run = finetune(data, weights, folder / f"{tag}_{norms}", args.iterations, norms)
                    results[(dataset, norms, negatives)] = run | {"images": images}
        header = f"{'dataset':<10} {'norms':<7} {'negatives':<9} {'images':>6}  "
        header += "  ".join(f"loss q{q}" for q in range(1, 5)) + "  segm AP  bbox AP      s"
        print(f"\n{args.iterations} fine-tuning iterations from one COCO-shaped start, 2 images per batch")
        print(header)
        for (dataset, norms, negatives), run in results.items():
            quarters = "  ".join(f"{value:7.3f}" for value in _quarters(run["losses"]))
            print(
                f"{dataset:<10} {norms:<7} {'yes' if negatives else 'no':<9} {run['images']:>6}  {quarters}"
                f"  {run['segm_AP']:7.3f}  {run['bbox_AP']:7.3f}  {run['seconds']:5.0f}"
            )
        if args.plot:
            _plot(results, args.plot)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for axis, dataset in zip(axes, ("demo", "coco-mini"), strict=True):
        for (name, norms, negatives), run in results.items():
            if name == dataset:
                shown = "yes" if negatives else "no"
                label = f"{norms} norms, negatives {shown}, segm AP {run['segm_AP']:.3f}"
                smooth = np.convolve(run["losses"], np.ones(SMOOTHING) / SMOOTHING, mode="valid")
                steps = np.arange(len(smooth)) + SMOOTHING - 1
                axis.plot(steps, smooth, label=label, linestyle="-" if norms == "frozen" else "--")
        axis.set_title(f"{dataset}: total loss, mean of the last {SMOOTHING} iterations")
        axis.set_xlabel("iteration")
        axis.set_yscale("log")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
