"""The ``d2retrain`` command line: each workflow step, runnable by hand."""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from d2retrain import __version__
from d2retrain import commands as handlers
from d2retrain.core.config import allowed_values, section_defaults, subset_defaults, val_split_defaults
from d2retrain.core.errors import D2RetrainError
from d2retrain.core.logutil import configure_logging
from d2retrain.data.filtering import BALANCE_MODES

logger = logging.getLogger(__name__)

__all__ = ["main", "build_parser"]

THREADS = "CPU threads"
DEVICE = "auto (a GPU when one is visible), cpu or cuda"


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="export a model folder to ONNX or TorchScript with contract.json (verified on a val split)",
    )
    export.add_argument("--model", required=True, help="model folder (with classes.json)")
    export.add_argument(
        "--format", required=True, choices=allowed_values("export.formats"), help="the file to write"
    )
    export.add_argument("-o", "--output", required=True, help="export folder")
    export.add_argument("--val-json", help="filtered val annotations: verify AP and detections on them")
    export.add_argument("--val-images", help="the folder the val annotations' file_names are in")
    export.add_argument(
        "--reference-metrics", metavar="METRICS_JSON", help="eval/metrics.json: its AP is the reference"
    )
    export.add_argument("--threads", type=int, default=2, help=THREADS)
    export.set_defaults(handler=handlers.run_export)


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
    infer.add_argument(
        "--score-threshold", type=float, default=defaults["score_threshold"], help="lowest score kept"
    )
    infer.add_argument(
        "--max-detections",
        type=int,
        default=defaults["max_detections"],
        help="most instances per image or frame",
    )
    infer.add_argument("--device", default=defaults["device"], help=DEVICE)
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
    infer.add_argument(
        "--track",
        action="store_true",
        default=defaults["track"],
        help="link each video's instances into tracks (ByteTrack): track ids, <name>.tracks.csv and .json",
    )
    infer.add_argument(
        "--tracker",
        nargs="+",
        metavar="KEY=VALUE",
        default=[],
        help="tracker parameters (inference.tracker: lost_track_buffer=60 minimum_iou=0.1 ...)",
    )
    infer.add_argument(
        "--trail-frames",
        type=int,
        default=defaults["trail_frames"],
        help="with --track: draw each track's path over this many frames (0: none)",
    )
    infer.add_argument(
        "--frame-rate",
        type=float,
        default=defaults["frame_rate"],
        help="frames per second of a folder of frames given as a video (without a seqinfo.ini)",
    )
    infer.add_argument("--threads", type=int, default=2, help=THREADS)
    infer.set_defaults(handler=handlers.run_infer)
    track_eval = commands.add_parser(
        "track-eval",
        help="score a video's tracks against ground truth: HOTA, MOTA, IDF1, ID switches (MOTChallenge)",
    )
    track_eval.add_argument(
        "--gt", required=True, help="ground truth (frame, id, x, y, w, h, conf, class, visibility)"
    )
    track_eval.add_argument(
        "--pred", required=True, help="tracks: videos/<name>.tracks.csv of d2retrain infer"
    )
    track_eval.add_argument(
        "--frames", type=int, help="the video's frame count (default: the tracks.json beside --pred)"
    )
    track_eval.add_argument("-o", "--output", help="also write the scores as JSON")
    track_eval.set_defaults(handler=handlers.run_track_eval)


def _add_model_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train (or resume) a Mask R-CNN on filtered annotations")
    train.add_argument("--train-json", required=True, help="filtered (balanced) training annotations")
    train.add_argument("--train-images", required=True, help="the training images' folder")
    train.add_argument("--val-json", required=True, help="filtered val annotations (AP during training)")
    train.add_argument("--val-images", required=True, help="the val images' folder")
    train.add_argument("--source-json", help="unfiltered training annotations (original category ids)")
    train.add_argument("-c", "--categories", nargs="+", required=True, help="class names, in model order")
    train.add_argument("--config", help="YAML with `model` and `train` sections (schema defaults otherwise)")
    train.add_argument("--iterations", type=int, help="override train.iterations")
    train.add_argument("--repeat-factors", metavar="FILE", help="sample by a factor file (balance: repeat)")
    train.add_argument("--num-gpus", type=int, help="override train.num_gpus (processes, one per GPU)")
    train.add_argument("-o", "--output", required=True, help="model folder")
    train.add_argument("--threads", type=int, default=2, help=THREADS)
    train.set_defaults(handler=handlers.run_train)
    evaluate = commands.add_parser("evaluate", help="COCO AP of a model folder on a validation split")
    evaluate.add_argument("--model", required=True, help="model folder (with classes.json)")
    evaluate.add_argument("--val-json", required=True, help="filtered val annotations")
    evaluate.add_argument("--val-images", required=True, help="the val images' folder")
    evaluate.add_argument("-o", "--output", required=True, help="folder for metrics.json and per_class.csv")
    evaluate.add_argument("--device", default=section_defaults("train")["device"], help=DEVICE)
    evaluate.add_argument("--threads", type=int, default=2, help=THREADS)
    evaluate.set_defaults(handler=handlers.run_evaluate)
    _add_infer(commands)
    _add_export(commands)
    compare = commands.add_parser(
        "compare", help="model or experiment folders side by side (val/test AP, time)"
    )
    compare.add_argument("folders", nargs="+", help="model folders, or folders holding model/ and eval/")
    compare.add_argument(
        "--metric",
        default=subset_defaults()["select"],
        choices=allowed_values("subsets.*.select"),
        help="the val metric that marks the best",
    )
    compare.add_argument("-o", "--output", help="also write the whole table (per-class AP too) as CSV")
    compare.set_defaults(handler=handlers.run_compare)


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
    parser.set_defaults(handler=handlers.run_filter)


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo-data", help="write the deterministic demo dataset and video")
    demo.add_argument("output", help="destination folder")
    sizes = section_defaults("demo")
    demo.add_argument("--seed", type=int, default=sizes["seed"], help="the same seed, the same files")
    demo.add_argument("--train", type=int, default=sizes["train_images"], help="training images")
    demo.add_argument("--val", type=int, default=sizes["val_images"], help="validation images")
    demo.add_argument("--video-frames", type=int, default=sizes["video_frames"], help="frames of the video")
    demo.add_argument("--test", type=int, default=sizes["test_images"], help="test images (0: no test split)")
    demo.set_defaults(handler=handlers.run_demo_data)
    _add_filter(commands)
    balance = commands.add_parser("balance", help="keep only images holding every category")
    balance.add_argument("-i", "--input", required=True, help="filtered COCO JSON")
    balance.add_argument("-o", "--output", required=True, help="output JSON")
    balance.add_argument(
        "--mode",
        choices=BALANCE_MODES,
        default=subset_defaults()["balance"],
        help="all: images holding every category; none: every image; repeat: every image (sample by factors)",
    )
    _add_threads(balance)
    balance.set_defaults(handler=handlers.run_balance)
    merge = commands.add_parser(
        "merge", help="merge COCO datasets: categories by name after aliases, ids made unique"
    )
    merge.add_argument(
        "--dataset",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "JSON", "IMAGES"),
        help="a dataset: its name, COCO file and image folder (repeat for each)",
    )
    merge.add_argument(
        "--alias",
        nargs=2,
        action="append",
        metavar=("DATASET", "NAME=NEW_NAME"),
        help="call a category of a dataset by another name (repeat for each)",
    )
    merge.add_argument("-o", "--output", required=True, help="merged COCO JSON")
    merge.add_argument("--images-out", help="folder of <dataset>/<file_name> hard links (else copies)")
    merge.add_argument("--threads", type=int, default=4, help="files read at once")
    merge.set_defaults(handler=handlers.run_merge)
    repeat = commands.add_parser(
        "repeat-factors", help="LVIS repeat factors of a training file's images (balance: repeat)"
    )
    repeat.add_argument("-i", "--input", required=True, help="filtered training COCO JSON")
    repeat.add_argument("-o", "--output", required=True, help="factor file (JSON)")
    repeat.add_argument(
        "--threshold",
        type=float,
        default=subset_defaults()["repeat_threshold"],
        help="categories on a smaller share of the images are repeated (LVIS t)",
    )
    repeat.set_defaults(handler=handlers.run_repeat_factors)
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
    split.add_argument(
        "--test-fraction", type=float, default=split_defaults["test_fraction"], help="share held out as test"
    )
    split.add_argument("--test-output", metavar="TEST", help="the test JSON (with --test-fraction)")
    split.set_defaults(handler=handlers.run_split)
    for name, handler, text in (
        ("images", handlers.run_images, "hard-link or copy the images a COCO file names"),
        ("masks", handlers.run_masks, "render semantic and instance mask PNGs"),
    ):
        parser = commands.add_parser(name, help=text)
        parser.add_argument("-i", "--input", required=True, help="COCO JSON")
        parser.add_argument("-o", "--output", required=True, help="output folder")
        if name == "images":
            parser.add_argument("--image-dir", required=True, help="folder the file_names are relative to")
        parser.add_argument("--threads", type=int, default=1, help="files written at once")
        parser.set_defaults(handler=handler)
    stats = commands.add_parser("stats", help="per-category counts at each step, CSV and bar chart")
    stats.add_argument("inputs", nargs="+", metavar="SPLIT:STEP=FILE", help="a COCO file per split and step")
    stats.add_argument("-c", "--categories", nargs="+", required=True, help="category names to count")
    stats.add_argument("--csv", required=True, help="the counts table to write")
    stats.add_argument("--png", required=True, help="the bar chart to write")
    stats.set_defaults(handler=handlers.run_stats)
    categories = commands.add_parser(
        "categories", help="list a COCO file's categories with instances and images, to choose classes"
    )
    categories.add_argument("input", help="COCO JSON")
    categories.add_argument(
        "-c", "--categories", nargs="+", help="candidate classes: what the filter and balance: all would keep"
    )
    categories.set_defaults(handler=handlers.run_categories)


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser: its ``--help`` shows each option's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="d2retrain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-file", help="also write the log to this file")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
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
