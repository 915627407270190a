"""What each ``d2retrain`` subcommand does with its parsed arguments (:mod:`d2retrain.cli` parses)."""

import argparse
import logging
from pathlib import Path

from d2retrain.core.errors import D2RetrainError
from d2retrain.data.filtering import FilterOptions

logger = logging.getLogger(__name__)

__all__ = [
    "run_categories",
    "run_demo_data",
    "run_filter",
    "run_balance",
    "run_merge",
    "run_split",
    "run_images",
    "run_masks",
    "run_stats",
    "run_train",
    "run_repeat_factors",
    "run_evaluate",
    "run_infer",
    "run_track_eval",
    "run_export",
    "run_compare",
]


def run_demo_data(args: argparse.Namespace) -> None:
    from d2retrain.data.demo import write_demo_dataset

    write_demo_dataset(
        args.output,
        seed=args.seed,
        train=args.train,
        val=args.val,
        video_frames=args.video_frames,
        test=args.test,
    )


def run_filter(args: argparse.Namespace) -> None:
    from d2retrain.data.prepare import filter_file

    options = FilterOptions(
        min_area=args.min_area, drop_crowd=args.drop_crowd, keep_empty_images=args.keep_empty_images
    )
    filter_file(args.input, args.output, args.categories, options, args.threads)


def run_balance(args: argparse.Namespace) -> None:
    from d2retrain.data.prepare import balance_file

    balance_file(args.input, args.output, args.mode, args.threads)


def run_merge(args: argparse.Namespace) -> None:
    from d2retrain.data.merge import MergeSource, merge_files

    aliases: dict[str, dict[str, str]] = {}
    for dataset, pair in args.alias or []:
        original, equals, renamed = pair.partition("=")
        if not equals or not original or not renamed:
            raise D2RetrainError(f"--alias {dataset} {pair!r}: expected DATASET NAME=NEW_NAME")
        aliases.setdefault(dataset, {})[original] = renamed
    names = [name for name, _, _ in args.dataset]
    unknown = sorted(set(aliases) - set(names))
    if unknown:
        raise D2RetrainError(f"--alias names no --dataset: {', '.join(unknown)}")
    sources = [
        MergeSource(name, annotations, images, aliases.get(name, {}))
        for name, annotations, images in args.dataset
    ]
    merge_files(sources, args.output, args.images_out, args.threads)


def run_split(args: argparse.Namespace) -> None:
    from d2retrain.data.split import split_file

    train, val = args.output
    split_file(
        args.input,
        train,
        val,
        args.val_fraction,
        args.seed,
        args.test_output,
        test_fraction=args.test_fraction,
    )


def run_images(args: argparse.Namespace) -> None:
    from d2retrain.data.masks import copy_images

    copy_images(args.input, args.image_dir, args.output, threads=args.threads)


def run_masks(args: argparse.Namespace) -> None:
    from d2retrain.data.masks import render_masks

    render_masks(args.input, args.output, threads=args.threads)


def run_stats(args: argparse.Namespace) -> None:
    from d2retrain.data.stats import write_stats

    steps: dict[str, dict[str, str]] = {}
    for item in args.inputs:
        label, _, path = item.partition("=")
        split, _, step = label.rpartition(":")
        if not path or not step:
            raise D2RetrainError(
                f"stats input {item!r}: expected SPLIT:STEP=FILE, e.g. train:filtered=out.json"
            )
        steps.setdefault(split or "train", {})[step] = path
    write_stats(steps, args.categories, args.csv, args.png, title=", ".join(args.categories))


def run_train(args: argparse.Namespace) -> None:
    from d2retrain.core.config import load_config, with_defaults
    from d2retrain.train.run import train_from_config

    config = load_config(args.config) if args.config else with_defaults({})
    if args.iterations:
        config["train"]["iterations"] = args.iterations
    if args.num_gpus:
        config["train"]["num_gpus"] = args.num_gpus
    train_from_config(
        model=config["model"],
        train=config["train"],
        classes=args.categories,
        train_json=args.train_json,
        train_images=args.train_images,
        val_json=args.val_json,
        val_images=args.val_images,
        source_json=args.source_json or args.train_json,
        output_dir=args.output,
        threads=args.threads,
        repeat_factors=args.repeat_factors,
    )


def run_repeat_factors(args: argparse.Namespace) -> None:
    from d2retrain.data.repeat import write_repeat_factors

    write_repeat_factors(args.input, args.output, args.threshold)


def run_evaluate(args: argparse.Namespace) -> None:
    from d2retrain.model.engines import evaluate_model
    from d2retrain.model.folder import ModelFolder

    classes = ModelFolder(args.model).read_classes().classes
    out = Path(args.output)
    evaluate_model(
        args.model,
        args.val_json,
        args.val_images,
        classes,
        str(out / "metrics.json"),
        str(out / "per_class.csv"),
        device=args.device,
        threads=args.threads,
    )


def run_infer(args: argparse.Namespace) -> int:
    from d2retrain.core.config import check_config, with_defaults
    from d2retrain.infer.inputs import discover
    from d2retrain.infer.pipeline import inference_options, run_inference

    if (args.tracker or args.trail_frames) and not args.track:
        raise D2RetrainError("--tracker and --trail-frames set how videos are tracked: add --track")
    section = {
        "score_threshold": args.score_threshold,
        "max_detections": args.max_detections,
        "device": args.device,
        "save_frames": args.save_frames,
        "max_frames": args.max_frames,
        "batch_size": args.batch_size,
        "track": args.track,
        "tracker": _key_values(args.tracker, "--tracker"),
        "trail_frames": args.trail_frames,
        "frame_rate": args.frame_rate,
    }
    check_config({"inference": section}, "arguments", required=False)
    options = inference_options(with_defaults({"inference": section})["inference"])
    images = discover(args.images, "image")
    videos = discover(args.videos, "video")
    if not images and not videos:
        raise D2RetrainError("nothing to infer: give images with -i and/or videos with -v")
    statuses = run_inference(
        args.model, images, videos, args.output, options, args.classes, threads=args.threads, reuse=args.reuse
    )
    if args.coco_out:
        from d2retrain.infer.cocoout import write_predictions_coco
        from d2retrain.model.exported import model_classes

        classes, source_ids = model_classes(args.model)
        write_predictions_coco(statuses, args.output, classes, source_ids, args.coco_out)
    return 1 if any(status.status != "ok" for status in statuses) else 0


def _key_values(pairs: list[str], option: str) -> dict:
    """``KEY=VALUE`` arguments as a dict, each value read as YAML (``0.5`` is a number).

    Raises:
        D2RetrainError: An argument without ``=``.
    """
    import yaml

    values = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise D2RetrainError(f"{option}: {pair!r} is not KEY=VALUE")
        values[key] = yaml.safe_load(value)
    return values


def run_track_eval(args: argparse.Namespace) -> None:
    import json

    from d2retrain.core.fileio import write_text_atomic
    from d2retrain.infer.trackscore import METRICS, score_tracks

    scores = score_tracks(args.gt, args.pred, args.frames)
    width = max(len(name) for name, _ in METRICS)
    for name, meaning in METRICS:
        print(f"{name:<{width}}  {scores[name]:>8}  {meaning}")
    if args.output:
        write_text_atomic(args.output, json.dumps(scores, indent=1) + "\n")


def run_export(args: argparse.Namespace) -> None:
    from d2retrain.model.export import export_model

    if (args.val_json is None) != (args.val_images is None):
        raise D2RetrainError("give both --val-json and --val-images to verify the export, or neither")
    export_model(
        args.model,
        args.format,
        args.output,
        args.val_json,
        args.val_images,
        reference_metrics=args.reference_metrics,
        threads=args.threads,
    )


def run_compare(args: argparse.Namespace) -> None:
    from d2retrain.compare import comparison_table, find_run, select_run
    from d2retrain.core.fileio import write_text_atomic

    names = [Path(folder).resolve() for folder in args.folders]
    runs = [
        find_run(folder, name=_short_name(path, names))
        for folder, path in zip(args.folders, names, strict=True)
    ]
    table = comparison_table(runs)
    selected = select_run(table, args.metric)
    table.insert(1, "selected", table["experiment"] == selected["experiment"])
    shown = [c for c in table.columns if "_AP_" not in str(c) and not str(c).endswith(("AP50", "AP75"))]
    print(table[shown].to_string(index=False, float_format="{:.3f}".format))
    print(f"highest val {args.metric}: {selected['experiment']} ({selected['value']:.4f})")
    if args.output:
        write_text_atomic(args.output, table.to_csv(index=False))


def _short_name(path: Path, paths: list[Path]) -> str:
    """A folder's name in the table: its path below the folders' common parent (a model folder's
    ``model`` part left out)."""
    import os

    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else path.parent
    relative = path.relative_to(common) if path != common else Path(path.name)
    parts = [part for part in relative.parts if part != "model"] or [path.name]
    return "/".join(parts)


def run_categories(args: argparse.Namespace) -> None:
    from d2retrain.data.catalog import candidate_classes, category_catalog
    from d2retrain.data.coco import read_coco

    document = read_coco(args.input)
    if not args.categories:
        catalog = category_catalog(document)
        print(f"{args.input}: {len(document.images)} images, {len(catalog)} categories")
        print(catalog.to_string(index=False))
        return
    found = candidate_classes(document, args.categories)
    print(found.counts.to_string(index=False))
    print(
        f"images: {found.images} in the file, {found.with_any} with any of these classes (balance: none), "
        f"{found.with_all} with every one (balance: all keeps {found.with_all / max(1, found.with_any):.0%})"
    )
