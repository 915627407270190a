"""Training throughput: the workflow's training function against a plain loop on the engine's API.

Runs, on the same data and config, N iterations through `d2retrain.model.engines.train_from_config`
and through a loop written straight on the engine (torchvision: model + SGD; detectron2:
a plain `DefaultTrainer`), and prints images/s of each and their ratio (target >= 0.95).

Usage: python benchmarks/bench_train.py --data DIR [--engine torchvision|detectron2] [--iterations N]
where DIR holds the demo dataset and the filtered files (a finished `snakemake data` run).
"""

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from d2retrain.core.config import section_defaults, with_defaults
from d2retrain.data.records import load_records
from d2retrain.model.engines import resolve_engine
from d2retrain.model.specs import model_spec, solver_spec
from d2retrain.train.run import train_from_config
from d2retrain.train.samples import TrainSamples

logger = logging.getLogger("bench_train")

__all__ = ["plain_torchvision", "plain_detectron2", "main"]

CLASSES = ["person", "sports ball"]


def plain_torchvision(paths: dict, iterations: int, train: dict) -> float:
    """The obvious torchvision loop: build, SGD, iterate. Returns seconds for the timed iterations."""
    from d2retrain.model.tv import build_model

    config = with_defaults({"train": train})
    solver = solver_spec(config["train"])
    torch.manual_seed(solver.seed)
    model = build_model(model_spec(config["model"], "torchvision"), len(CLASSES), solver).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=solver.base_lr, momentum=0.9, weight_decay=1e-4)
    samples = TrainSamples(load_records(paths["train"], paths["train_images"]), solver.seed, solver.flip)
    loader = torch.utils.data.DataLoader(
        samples,
        batch_size=solver.images_per_batch,
        sampler=range(iterations * solver.images_per_batch),
        collate_fn=lambda batch: tuple(zip(*batch, strict=True)),
    )
    start = None
    for step, (images, targets) in enumerate(loader):
        if step == 2:
            start = time.perf_counter()  # skip warm-up iterations, as the workflow side does
        losses = model(list(images), list(targets))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return time.perf_counter() - start


def plain_detectron2(paths: dict, iterations: int, train: dict, model: dict) -> float:
    """A plain DefaultTrainer on the same config. Returns seconds for the timed iterations."""
    from detectron2.engine import DefaultTrainer, hooks

    from d2retrain.model.d2 import build_config
    from d2retrain.train.d2 import register_split

    config = with_defaults({"model": model, "train": train})
    solver = solver_spec(config["train"])
    marks = {}
    with tempfile.TemporaryDirectory() as output:
        cfg = build_config(model_spec(config["model"], "detectron2"), len(CLASSES), "auto", solver, output)
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (
            (register_split("bench_train", paths["train"], paths["train_images"], CLASSES),),
            (),
        )
        trainer = DefaultTrainer(cfg)
        trainer.register_hooks(
            [hooks.CallbackHook(after_step=lambda t: marks.setdefault(t.iter, time.perf_counter()))]
        )
        trainer.train()
    return marks[iterations - 1] - marks[1]


def _workflow(paths: dict, iterations: int, train: dict, model: dict) -> float:
    with tempfile.TemporaryDirectory() as output:
        start = time.perf_counter()
        train_from_config(
            model=model,
            train=train,
            classes=CLASSES,
            train_json=paths["train"],
            train_images=paths["train_images"],
            val_json=paths["val"],
            val_images=paths["val_images"],
            source_json=paths["source"],
            output_dir=output,
            threads=torch.get_num_threads(),
        )
        total = time.perf_counter() - start
        lines = (Path(output) / "metrics.jsonl").read_text().splitlines()
    times = [json.loads(line)["time"] for line in lines[2:]]
    logger.info("workflow: %.1f s end to end (setup and final files included)", total)
    return sum(times)


def main() -> None:
    """Run both sides and print images/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="a folder with a finished `snakemake data` run"
    )
    parser.add_argument("--subset", default="person_ball")
    parser.add_argument("--engine", default="torchvision")
    parser.add_argument("--architecture", default=None)
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = {
        "train": str(args.data / "results" / args.subset / "data" / "train.json"),
        "val": str(args.data / "results" / args.subset / "data" / "val.json"),
        "train_images": str(args.data / "resources/demo/train"),
        "val_images": str(args.data / "resources/demo/val"),
        "source": str(args.data / "resources/demo/annotations/instances_train.json"),
    }
    engine = resolve_engine(args.engine)
    architecture = args.architecture or section_defaults("model")["architecture"]
    model = {"engine": engine, "architecture": architecture}
    train = {
        "iterations": args.iterations,
        "checkpoint_period": 10**6,
        "eval_period": 0,
        "warmup_iterations": 0,
        "steps": [],
        "base_lr": 0.002,
    }
    timed = (args.iterations - 2) * with_defaults({"train": train})["train"]["images_per_batch"]
    ours = _workflow(paths, args.iterations, train, model)
    plain = (
        plain_torchvision(paths, args.iterations, train)
        if engine == "torchvision"
        else plain_detectron2(paths, args.iterations, train, model)
    )
    logger.info(
        "%s, %d timed iterations: workflow %.2f img/s, plain loop %.2f img/s, ratio %.3f (target >= 0.95)",
        engine,
        args.iterations - 2,
        timed / ours,
        timed / plain,
        plain / ours,
    )


if __name__ == "__main__":
    main()
