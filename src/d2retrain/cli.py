"""The ``d2retrain`` command line: each workflow step, runnable by hand."""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from d2retrain import __version__
from d2retrain.core.config import allowed_values, section_defaults, subset_defaults, val_split_defaults
from d2retrain.core.errors import D2RetrainError
from d2retrain.core.logutil import configure_logging
from d2retrain.data.filtering import BALANCE_MODES, FilterOptions

logger = logging.getLogger(__name__)

__all__ = ["main", "build_parser"]


def _demo_data(args: argparse.Namespace) -> None:
    from d2retrain.data.demo import write_demo_dataset

    write_demo_dataset(
        args.output, seed=args.seed, train=args.train, val=args.val, video_frames=args.video_frames
    )


def _filter(args: argparse.Namespace) -> None:
    from d2retrain.data.prepare import filter_file

    options = FilterOptions(
        min_area=args.min_area, drop_crowd=args.drop_crowd, keep_empty_images=args.keep_empty_images
    )
    filter_file(args.input, args.output, args.categories, options, args.threads)


def _balance(args: argparse.Namespace) -> None:
    from d2retrain.data.prepare import balance_file

    balance_file(args.input, args.output, args.mode, args.threads)


def _merge(args: argparse.Namespace) -> None:
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


def _split(args: argparse.Namespace) -> None:
    from d2retrain.data.split import split_file

    train, val = args.output
    split_file(args.input, train, val, args.val_fraction, args.seed)


def _images(args: argparse.Namespace) -> None:
    from d2retrain.data.masks import copy_images

    copy_images(args.input, args.image_dir, args.output, threads=args.threads)


def _masks(args: argparse.Namespace) -> None:
    from d2retrain.data.masks import render_masks

    render_masks(args.input, args.output, threads=args.threads)


def _stats(args: argparse.Namespace) -> None:
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


def _train(args: argparse.Namespace) -> None:
    from d2retrain.core.config import load_config
    from d2retrain.train.run import train_from_config

    config = load_config(args.config) if args.config else {"model": {}, "train": {}}
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


def _repeat_factors(args: argparse.Namespace) -> None:
    from d2retrain.data.repeat import write_repeat_factors

    write_repeat_factors(args.input, args.output, args.threshold)


def _evaluate(args: argparse.Namespace) -> None:
    from d2retrain.model.engines import evaluate_model
    from d2retrain.model.specs import read_classes

    classes = read_classes(args.model).classes
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


def _infer(args: argparse.Namespace) -> int:
    from d2retrain.infer.inputs import discover
    from d2retrain.infer.pipeline import inference_options, run_inference

    options = inference_options(
        {
            "score_threshold": args.score_threshold,
            "max_detections": args.max_detections,
            "device": args.device,
            "save_frames": args.save_frames,
            "max_frames": args.max_frames,
            "batch_size": args.batch_size,
        }
    )
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


def _export(args: argparse.Namespace) -> None:
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


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="export a model folder to ONNX or TorchScript with contract.json (verified on a val split)",
    )
    export.add_argument("--model", required=True, help="model folder (with classes.json)")
    export.add_argument("--format", required=True, choices=allowed_values("export.formats"))
    export.add_argument("-o", "--output", required=True, help="export folder")
    export.add_argument("--val-json", help="filtered val annotations: verify AP and detections on them")
    export.add_argument("--val-images")
    export.add_argument(
        "--reference-metrics", metavar="METRICS_JSON", help="eval/metrics.json: its AP is the reference"
    )
    export.add_argument("--threads", type=int, default=2)
    export.set_defaults(handler=_export)


def _add_infer(commands: argparse._SubParsersAction) -> None:
    defaults = section_defaults("inference")
    infer = commands.add_parser(
        "infer",
        help="draw and save a model's predictions on images and videos (exit 1 if a file was not inferred)",
    )
    infer.add_argument(
        "--model", required=True, help="model folder (classes.json) or export folder (contract.json)"
    )
    infer.add_argument("-i", "--images", nargs="+", default=[], help="image files, folders or globs")
    infer.add_argument("-v", "--videos", nargs="+", default=[], help="video files, folders or globs")
    infer.add_argument("-o", "--output", required=True, help="folder for images/ and videos/")
    infer.add_argument("--classes", nargs="+", help="refuse a model trained for other classes")
    infer.add_argument("--score-threshold", type=float, default=defaults["score_threshold"])
    infer.add_argument("--max-detections", type=int, default=defaults["max_detections"])
    infer.add_argument("--device", default=defaults["device"])
    infer.add_argument(
        "--save-frames",
        action="store_true",
        default=defaults["save_frames"],
        help="also write video frames as PNG",
    )
    infer.add_argument(
        "--max-frames", type=int, default=defaults["max_frames"], help="frames per video (0: all)"
    )
    infer.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="images per pass")
    infer.add_argument(
        "--coco-out",
        metavar="FILE",
        help="also write the images' predictions as one COCO dataset file (to correct in a labelling tool)",
    )
    infer.add_argument(
        "--reuse",
        action="store_true",
        help="keep the outputs of files inferred before from the same content, model and output options "
        "(a record beside each file's outputs says); infer only the others",
    )
    infer.add_argument("--threads", type=int, default=2)
    infer.set_defaults(handler=_infer)


def _add_model_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train (or resume) a Mask R-CNN on filtered annotations")
    train.add_argument("--train-json", required=True, help="filtered (balanced) training annotations")
    train.add_argument("--train-images", required=True)
    train.add_argument("--val-json", required=True)
    train.add_argument("--val-images", required=True)
    train.add_argument("--source-json", help="unfiltered training annotations (original category ids)")
    train.add_argument("-c", "--categories", nargs="+", required=True, help="class names, in model order")
    train.add_argument("--config", help="YAML with `model` and `train` sections (schema defaults otherwise)")
    train.add_argument("--iterations", type=int, help="override train.iterations")
    train.add_argument("--repeat-factors", metavar="FILE", help="sample by a factor file (balance: repeat)")
    train.add_argument("--num-gpus", type=int, help="override train.num_gpus (processes, one per GPU)")
    train.add_argument("-o", "--output", required=True, help="model folder")
    train.add_argument("--threads", type=int, default=2)
    train.set_defaults(handler=_train)
    evaluate = commands.add_parser("evaluate", help="COCO AP of a model folder on a validation split")
    evaluate.add_argument("--model", required=True, help="model folder (with classes.json)")
    evaluate.add_argument("--val-json", required=True)
    evaluate.add_argument("--val-images", required=True)
    evaluate.add_argument("-o", "--output", required=True, help="folder for metrics.json and per_class.csv")
    evaluate.add_argument("--device", default=section_defaults("train")["device"])
    evaluate.add_argument("--threads", type=int, default=2)
    evaluate.set_defaults(handler=_evaluate)
    _add_infer(commands)
    _add_export(commands)


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=2, help="processes for large files (1 or 2: halves decoded at once)"
    )


def _add_filter(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("filter", help="keep chosen categories of a COCO file, renumbered 1..N")
    parser.add_argument(
        "-i", "--input", "--input_json", dest="input", required=True, help="COCO instances JSON"
    )
    parser.add_argument("-o", "--output", "--output_json", dest="output", required=True, help="output JSON")
    parser.add_argument(
        "-c", "--categories", nargs="+", required=True, help="category names, in model class order"
    )
    subset = subset_defaults()
    parser.add_argument(
        "--min-area", type=float, default=subset["min_area"], help="drop annotations of smaller area"
    )
    parser.add_argument(
        "--drop-crowd", action="store_true", default=subset["drop_crowd"], help="drop iscrowd annotations"
    )
    parser.add_argument(
        "--keep-empty-images",
        action="store_true",
        default=subset["keep_empty_images"],
        help="keep images with no kept annotation (negatives)",
    )
    _add_threads(parser)
    parser.set_defaults(handler=_filter)


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo-data", help="write the deterministic demo dataset and video")
    demo.add_argument("output", help="destination folder")
    sizes = section_defaults("demo")
    demo.add_argument("--seed", type=int, default=sizes["seed"])
    demo.add_argument("--train", type=int, default=sizes["train_images"], help="training images")
    demo.add_argument("--val", type=int, default=sizes["val_images"], help="validation images")
    demo.add_argument("--video-frames", type=int, default=sizes["video_frames"])
    demo.set_defaults(handler=_demo_data)
    _add_filter(commands)
    balance = commands.add_parser("balance", help="keep only images holding every category")
    balance.add_argument("-i", "--input", required=True, help="filtered COCO JSON")
    balance.add_argument("-o", "--output", required=True, help="output JSON")
    balance.add_argument("--mode", choices=BALANCE_MODES, default=subset_defaults()["balance"])
    _add_threads(balance)
    balance.set_defaults(handler=_balance)
    merge = commands.add_parser(
        "merge", help="merge COCO datasets: categories by name after aliases, ids made unique"
    )
    merge.add_argument(
        "--dataset", nargs=3, action="append", required=True, metavar=("NAME", "JSON", "IMAGES")
    )
    merge.add_argument("--alias", nargs=2, action="append", metavar=("DATASET", "NAME=NEW_NAME"))
    merge.add_argument("-o", "--output", required=True, help="merged COCO JSON")
    merge.add_argument("--images-out", help="folder of <dataset>/<file_name> hard links (else copies)")
    merge.add_argument("--threads", type=int, default=4)
    merge.set_defaults(handler=_merge)
    repeat = commands.add_parser(
        "repeat-factors", help="LVIS repeat factors of a training file's images (balance: repeat)"
    )
    repeat.add_argument("-i", "--input", required=True, help="filtered training COCO JSON")
    repeat.add_argument("-o", "--output", required=True, help="factor file (JSON)")
    repeat.add_argument("--threshold", type=float, default=subset_defaults()["repeat_threshold"])
    repeat.set_defaults(handler=_repeat_factors)
    split = commands.add_parser(
        "split", help="split one COCO file into train and val (every category on both sides)"
    )
    split.add_argument("input", help="COCO JSON")
    split.add_argument(
        "-o", "--output", nargs=2, required=True, metavar=("TRAIN", "VAL"), help="output JSONs"
    )
    split_defaults = val_split_defaults()
    split.add_argument(
        "--val-fraction", type=float, default=split_defaults["fraction"], help="share of images"
    )
    split.add_argument(
        "--seed", type=int, default=split_defaults["seed"], help="the same seed, the same split"
    )
    split.set_defaults(handler=_split)
    for name, handler, text in (
        ("images", _images, "hard-link or copy the images a COCO file names"),
        ("masks", _masks, "render semantic and instance mask PNGs"),
    ):
        parser = commands.add_parser(name, help=text)
        parser.add_argument("-i", "--input", required=True, help="COCO JSON")
        parser.add_argument("-o", "--output", required=True, help="output folder")
        if name == "images":
            parser.add_argument("--image-dir", required=True, help="folder the file_names are relative to")
        parser.add_argument("--threads", type=int, default=1)
        parser.set_defaults(handler=handler)
    stats = commands.add_parser("stats", help="per-category counts at each step, CSV and bar chart")
    stats.add_argument("inputs", nargs="+", metavar="SPLIT:STEP=FILE")
    stats.add_argument("-c", "--categories", nargs="+", required=True)
    stats.add_argument("--csv", required=True)
    stats.add_argument("--png", required=True)
    stats.set_defaults(handler=_stats)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="d2retrain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-file", help="also write the log to this file")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_commands(commands)
    _add_model_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a user error prints one line and returns 2.

    Args:
        argv: Arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        The exit status.
    """
    args = build_parser().parse_args(argv)
    configure_logging(args.log_file, logging.WARNING if args.quiet else logging.INFO)
    handler: Callable[[argparse.Namespace], int | None] = args.handler
    try:
        status = handler(args) or 0
    except D2RetrainError as error:
        print(f"d2retrain {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"d2retrain {args.command}: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
