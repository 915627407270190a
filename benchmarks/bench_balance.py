"""Balancing a skewed dataset: `none`, `all` and `repeat`, rare and common class segm AP.

The demo's training split is made skewed the way users' data is: `sports ball` is kept on only
``--rare-share`` of the training images (its other instances are removed; the val split is left
whole, so every class is measured on the same images). Each mode then trains the demo network from
scratch for ``--iterations`` iterations with ``--seeds`` seeds, and the val segm AP of the rare class
(`sports ball`) and of the common one (`person`) are printed, mean and spread over the seeds:

- ``none``: every filtered image;
- ``all``: only the images holding both classes (what the original recipe did);
- ``repeat``: every image, the rare class's images repeated (LVIS, ``--threshold``).

Usage: python benchmarks/bench_balance.py [--iterations 200] [--seeds 3] [--rare-share 0.05] [--threshold 0.3]
"""

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from d2retrain.data.demo import write_demo_dataset
from d2retrain.data.filtering import FilterOptions
from d2retrain.data.prepare import balance_file, filter_file
from d2retrain.data.repeat import write_repeat_factors
from d2retrain.model.engines import evaluate_model
from d2retrain.train.run import train_from_config

__all__ = ["skewed", "run", "main"]

CLASSES = ["person", "sports ball"]
RARE, COMMON = "sports ball", "person"


def skewed(source: Path, output: Path, share: float, seed: int = 0) -> int:
    """Copy a COCO file keeping the rare class on ``share`` of its images only; returns how many."""
    document = json.loads(source.read_text())
    rare = next(c["id"] for c in document["categories"] if c["name"] == RARE)
    holding = sorted({a["image_id"] for a in document["annotations"] if a["category_id"] == rare})
    keep = max(1, round(share * len(document["images"])))
    kept = set(np.random.default_rng(seed).permutation(holding)[:keep].tolist())
    document["annotations"] = [
        a for a in document["annotations"] if a["category_id"] != rare or a["image_id"] in kept
    ]
    output.write_text(json.dumps(document))
    return len(kept)


def run(demo, data: dict, folder: Path, mode: str, seed: int, iterations: int, threshold: float) -> dict:
    """Train one mode with one seed; return its per-class val segm AP and seconds."""
    train_json = data["filtered"]
    factors = None
    if mode == "all":
        train_json = str(folder / "balanced_all.json")
        balance_file(data["filtered"], train_json, "all")
    elif mode == "repeat":
        factors = str(folder / "repeat_factors.json")
        write_repeat_factors(data["filtered"], factors, threshold)
    output = folder / f"{mode}_{seed}"
    start = time.perf_counter()
    train = {"iterations": iterations, "eval_period": 0, "checkpoint_period": iterations, "seed": seed}
    train |= {
        "steps": [int(iterations * 0.8)],
        "warmup_iterations": min(50, iterations // 4),
        "device": "cpu",
    }
    train_from_config(
        model={"engine": "torchvision", "architecture": "maskrcnn_resnet18_fpn"},
        train=train,
        classes=CLASSES,
        train_json=train_json,
        train_images=str(demo.images("train")),
        val_json=data["val"],
        val_images=str(demo.images("val")),
        source_json=str(demo.annotations("train")),
        output_dir=str(output),
        threads=torch.get_num_threads(),
        repeat_factors=factors,
    )
    evaluate_model(
        str(output), data["val"], str(demo.images("val")), CLASSES,
        str(output / "metrics.json"), str(output / "per_class.csv"), device="cpu",
    )  # fmt: skip
    table = pd.read_csv(output / "per_class.csv")
    segm = table[(table.model == "retrained") & (table.kind == "segm")].set_index("class").AP
    images = len(json.loads(Path(train_json).read_text())["images"])
    return {
        "rare": segm[RARE],
        "common": segm[COMMON],
        "seconds": time.perf_counter() - start,
        "images": images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--rare-share", type=float, default=0.05, help="share of training images with the rare class"
    )
    parser.add_argument("--threshold", type=float, default=0.3, help="repeat_threshold of the repeat mode")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        demo = write_demo_dataset(folder / "demo")
        rare_images = skewed(demo.annotations("train"), folder / "skewed.json", args.rare_share)
        data = {"filtered": str(folder / "filtered.json"), "val": str(folder / "val.json")}
        filter_file(str(folder / "skewed.json"), data["filtered"], CLASSES, FilterOptions())
        filter_file(str(demo.annotations("val")), data["val"], CLASSES, FilterOptions())
        results: dict[str, list[dict]] = {}
        for mode in ("none", "all", "repeat"):
            results[mode] = [
                run(demo, data, folder, mode, seed, args.iterations, args.threshold)
                for seed in range(args.seeds)
            ]
    print(
        f"\nthe demo's training split with {RARE} on {rare_images} images only; {args.iterations} iterations "
        f"from scratch, {args.seeds} seeds; repeat threshold {args.threshold}; val segm AP per class"
    )
    print(f"{'mode':<8} {'train images':>12}  {RARE + ' AP':>16}  {COMMON + ' AP':>16}  {'s per run':>9}")
    for mode, runs in results.items():

        def spread(key: str, runs: list[dict] = runs) -> str:
            values = [r[key] for r in runs]
            deviation = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {deviation:.3f}"

        seconds = statistics.mean(r["seconds"] for r in runs)
        print(
            f"{mode:<8} {runs[0]['images']:>12}  {spread('rare'):>16}  {spread('common'):>16}  {seconds:9.0f}"
        )


if __name__ == "__main__":
    main()
