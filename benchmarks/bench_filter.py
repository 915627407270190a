"""Filter + balance speed and peak memory: `d2retrain` against the obvious json implementation.

Generates a COCO file shaped like instances_train2014.json (82,783 images, 604,907
annotations with polygons, ~250 MB), then runs, each as a child process of this one,
`d2retrain filter` + `d2retrain balance` and the obvious implementation (json.load, dict
loops, json.dump), each side --repeats times (3) in alternating order, checks both give the
same content and prints the median times and ratio.

Usage: python benchmarks/bench_filter.py [--workdir DIR] [--images N] [--annotations N]
"""

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from alternating import alternating

logger = logging.getLogger("bench_filter")

__all__ = ["generate", "obvious_filter", "obvious_balance", "main"]

NAMES = ["person", "sports ball"]


def _categories() -> list[dict]:
    names = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"]
    names += [f"thing {i}" for i in range(len(names), 80)]
    names[32] = "sports ball"
    ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    return [{"supercategory": "s", "id": cid, "name": name} for cid, name in zip(ids, names, strict=True)]


def _polygon_pool(rng: np.random.Generator, size: int = 4096) -> list[str]:
    pool = []
    for _ in range(size):
        points = rng.integers(6, 44) * 2
        values = np.round(rng.uniform(0, 640, size=points), 2)
        pool.append("[[" + ",".join(f"{v:.2f}" for v in values) + "]]")
    return pool


def generate(path: Path, images: int = 82_783, annotations: int = 604_907, seed: int = 0) -> None:
    """Write a COCO file with COCO-like category frequencies (person ~30%, sports ball ~0.7%)."""
    rng = np.random.default_rng(seed)
    categories = _categories()
    weights = np.full(len(categories), 1.0)
    weights[0], weights[32] = 185_316 / 604_907 * 80, 4392 / 604_907 * 80
    weights /= weights.sum()
    category_ids = np.array([c["id"] for c in categories])[
        rng.choice(len(categories), annotations, p=weights)
    ]
    image_ids = np.sort(rng.choice(np.arange(1, 600_000), images, replace=False))
    owner = image_ids[rng.integers(0, images, annotations)]
    pool = _polygon_pool(rng)
    with path.open("w") as out:
        out.write(
            '{"info":{"description":"synthetic train2014","year":2014},"licenses":[{"id":1,"name":"x"}],'
        )
        out.write('"images":[')
        out.write(
            ",".join(
                f'{{"license":1,"file_name":"COCO_train2014_{i:012d}.jpg","coco_url":"http://x/{i}.jpg",'
                f'"height":480,"width":640,"date_captured":"2013-11-14 16:28:13","id":{i}}}'
                for i in image_ids.tolist()
            )
        )
        out.write('],"annotations":[')
        crowd = rng.random(annotations) < 0.01
        polygon = rng.integers(0, len(pool), annotations)
        area = np.round(rng.uniform(10, 50_000, annotations), 4)
        rows = []
        for k in range(annotations):
            segmentation = (
                '{"counts":[1200,30,610,40,305320],"size":[480,640]}' if crowd[k] else pool[polygon[k]]
            )
            rows.append(
                f'{{"segmentation":{segmentation},"area":{area[k]},"iscrowd":{int(crowd[k])},'
                f'"image_id":{owner[k]},"bbox":[1.5,2.5,30.0,40.0],'
                f'"category_id":{category_ids[k]},"id":{k + 1}}}'
            )
        out.write(",".join(rows))
        out.write('],"categories":' + json.dumps(categories) + "}")


def obvious_filter(source: str, target: str, names: list[str]) -> None:
    """Filter the way a first script would: json.load, dict loops, json.dump."""
    with open(source) as handle:
        data = json.load(handle)
    chosen = [next(c for c in data["categories"] if c["name"] == name) for name in names]
    new_id = {c["id"]: i + 1 for i, c in enumerate(chosen)}
    annotations = [a for a in data["annotations"] if a["category_id"] in new_id]
    for annotation in annotations:
        annotation["category_id"] = new_id[annotation["category_id"]]
    kept = {a["image_id"] for a in annotations}
    data["images"] = sorted((i for i in data["images"] if i["id"] in kept), key=lambda i: i["id"])
    data["annotations"] = sorted(annotations, key=lambda a: a["id"])
    data["categories"] = [
        {"id": i + 1, "name": c["name"], "supercategory": c["supercategory"]} for i, c in enumerate(chosen)
    ]
    with open(target, "w") as handle:
        json.dump(data, handle)


def obvious_balance(source: str, target: str) -> None:
    """Balance the way a first script would."""
    with open(source) as handle:
        data = json.load(handle)
    present: dict[int, set[int]] = {}
    for annotation in data["annotations"]:
        present.setdefault(annotation["image_id"], set()).add(annotation["category_id"])
    keep = {image for image, found in present.items() if len(found) == len(data["categories"])}
    data["images"] = [i for i in data["images"] if i["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    with open(target, "w") as handle:
        json.dump(data, handle)


def _run(command: list[str]) -> tuple[float, int]:
    """Run a child; return its wall time (s) and its own peak resident memory (bytes)."""
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command} failed")
    return elapsed, usage.ru_maxrss * 1024


def _pipeline(steps: list[list[str]]) -> tuple[float, int]:
    results = [_run(step) for step in steps]
    return sum(r[0] for r in results), max(r[1] for r in results)


def main() -> None:
    """Generate the file, run both implementations, compare outputs, print ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/.work"))
    parser.add_argument("--images", type=int, default=82_783)
    parser.add_argument("--annotations", type=int, default=604_907)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--obvious", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, args.images, args.annotations)
        return
    if args.obvious:
        step, *rest = args.obvious
        obvious_filter(rest[0], rest[1], NAMES) if step == "filter" else obvious_balance(rest[0], rest[1])
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.workdir / f"train_{args.images}_{args.annotations}.json"
    if not source.exists():
        # in a child: a child forked from a parent that built the file would count the
        # parent's pages in its own peak memory (ru_maxrss is inherited across fork + exec)
        start = time.perf_counter()
        sizes = ["--images", str(args.images), "--annotations", str(args.annotations)]
        subprocess.run([sys.executable, __file__, *sizes, "--generate", str(source)], check=True)
        logger.info(
            "generated %s (%.0f MB) in %.1f s",
            source,
            source.stat().st_size / 1e6,
            time.perf_counter() - start,
        )
    Path(source).read_bytes()  # page cache: both sides read a warm file
    ours = [args.workdir / "ours_filtered.json", args.workdir / "ours_balanced.json"]
    theirs = [args.workdir / "obvious_filtered.json", args.workdir / "obvious_balanced.json"]
    cli = [sys.executable, "-m", "d2retrain.cli", "-q"]
    me = [sys.executable, __file__, "--obvious"]
    sides = {
        "d2retrain": [
            [*cli, "filter", "-i", str(source), "-o", str(ours[0]), "-c", *NAMES],
            [*cli, "balance", "-i", str(ours[0]), "-o", str(ours[1])],
        ],
        "obvious": [
            [*me, "filter", str(source), str(theirs[0])],
            [*me, "balance", str(theirs[0]), str(theirs[1])],
        ],
    }
    runs = alternating(
        {side: functools.partial(_pipeline, steps) for side, steps in sides.items()}, args.repeats
    )
    (ours_time, ours_memory), (obvious_time, obvious_memory) = (
        (statistics.median(t for t, _ in runs[side]), max(m for _, m in runs[side])) for side in sides
    )
    ratios = [theirs_run[0] / ours_run[0] for ours_run, theirs_run in zip(*runs.values(), strict=True)]
    for mine, reference in zip(ours, theirs, strict=True):
        with mine.open() as a, reference.open() as b:
            if json.load(a) != json.load(b):
                raise SystemExit(f"outputs differ: {mine} vs {reference}")
    logger.info("outputs identical in content (filtered and balanced)")
    logger.info("median of %d runs each", args.repeats)
    logger.info("d2retrain: %.2f s, peak %.0f MB", ours_time, ours_memory / 1e6)
    logger.info("obvious:   %.2f s, peak %.0f MB", obvious_time, obvious_memory / 1e6)
    logger.info(
        "speed ratio (obvious / d2retrain): %.1fx (runs %.1f..%.1f)   target >= 10x",
        statistics.median(ratios),
        min(ratios),
        max(ratios),
    )
    logger.info("peak memory ratio (d2retrain / obvious): %.2f   target <= 0.5", ours_memory / obvious_memory)


if __name__ == "__main__":
    main()
