# Config lookups and path helpers; no logic beyond that.
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from d2retrain.core.codehash import code_hash
from d2retrain.core.config import allowed_values
from d2retrain.model.folder import ModelFolder
from d2retrain.workflow.experiments import resolve_experiments
from d2retrain.workflow.planning import (
    InferencePlan,
    demo_planned_files,
    lost_outputs,
    shards,
    tracked_videos,
)

SPLITS = ["train", "val"]


def model_folder(subset="{subset}"):
    """A subset's model folder (its file names are d2retrain.model.folder's); with the wildcard,
    the paths the rules declare."""
    return ModelFolder(f"results/{subset}/model")


MODEL = model_folder()
# A variant's model folder (subsets with experiments: docs/experiments.md).
EXPERIMENT = ModelFolder("results/{subset}/experiments/{experiment}/model")

# Each subset's variants ({} for a subset without experiments), checked at parse time.
try:
    EXPERIMENTS = {
        subset: resolve_experiments(subset, values, config["model"], config["train"])
        for subset, values in config["subsets"].items()
    }
except D2RetrainError as error:
    sys.exit(f"config: {error}")


def one_of(names):
    """A wildcard constraint matching exactly these names (nothing when there are none)."""
    return "|".join(map(re.escape, sorted(names, key=len, reverse=True))) or "(?!)"


# Subsets training one model (rule train) or several (rule train_experiment, then select).
PLAIN_SUBSET = one_of(name for name, variants in EXPERIMENTS.items() if not variants)
EXPERIMENT_SUBSET = one_of(name for name, variants in EXPERIMENTS.items() if variants)


wildcard_constraints:
    subset="|".join(map(re.escape, config["subsets"])),
    split="|".join([*SPLITS, "test"]),
    dataset="|".join(map(re.escape, config["datasets"])),
    format="|".join(allowed_values("export.formats")),
    experiment=one_of({name for variants in EXPERIMENTS.values() for name in variants}),


def cluster_resources(gpu):
    """SLURM partition and account from the config's cluster section; unset keys are left
    out, so the cluster's defaults apply (and local runs ignore them)."""
    cluster = config["cluster"]
    partition = (gpu and cluster["gpu_partition"]) or cluster["partition"]
    values = {"slurm_partition": partition, "slurm_account": cluster["account"]}
    return {key: value for key, value in values.items() if value}


CPU_JOB = cluster_resources(gpu=False)
GPU_JOB = cluster_resources(gpu=True)


def weights_check_input(wildcards):
    """The check_weights job's result, when base weights are set (none: nothing to check)."""
    if str(config["model"]["weights"]) in ("", "none"):
        return {}
    return {"weights_check": f"results/{wildcards.subset}/checks/weights.json"}


def subset_config(wildcards):
    return config["subsets"][wildcards.subset]


def subset_value(key):
    """Input/params function returning one key of the subset's config."""

    def lookup(wildcards):
        return subset_config(wildcards)[key]

    return lookup


def dataset_files(name, split):
    """{"images", "annotations"} of one split of a dataset: as the config gives it, or, for a
    dataset given as one file (`all` + `val_split`), the workflow's split of that file.
    """
    dataset = config["datasets"][name]
    if "all" in dataset:
        return {
            "images": dataset["all"]["images"],
            "annotations": f"results/splits/{name}/{split}.json",
        }
    return dataset[split]


def test_fraction(name):
    """The share of a dataset given as one file that the split cuts off as test (0: none)."""
    return config["datasets"][name].get("val_split", {}).get("test_fraction", 0)


def subset_has_test(subset):
    """Whether a subset has a test split: its one dataset has `test` or a val_split.test_fraction
    (merged datasets have none)."""
    names = subset_datasets(subset)
    dataset = config["datasets"][names[0]]
    return not merged(subset) and ("test" in dataset or test_fraction(names[0]) > 0)


for name, dataset in config["datasets"].items():
    if (
        test_fraction(name)
        and dataset["val_split"]["fraction"] + test_fraction(name) >= 1
    ):
        sys.exit(
            f"config: datasets.{name}.val_split: fraction and test_fraction add up to "
            f"{dataset['val_split']['fraction'] + test_fraction(name):g}; they must stay under 1 (train keeps the rest)"
        )

# Datasets given as one file whose split writes a test file too (rule split_dataset_test).
TEST_CUT = one_of(name for name in config["datasets"] if test_fraction(name) > 0)
NO_TEST_CUT = one_of(name for name in config["datasets"] if test_fraction(name) == 0)


def subset_datasets(subset):
    """The names of the datasets a subset reads: one, or several that are merged."""
    names = config["subsets"][subset]["dataset"]
    return [names] if isinstance(names, str) else list(names)


def merged(subset):
    """Whether a subset reads its data through the merge rule: several datasets, or one whose
    category names need its aliases."""
    names = subset_datasets(subset)
    return len(names) > 1 or bool(config["datasets"][names[0]].get("aliases"))


def subset_files(subset, split):
    """{"images", "annotations"} of what the filter reads for a subset's split: the dataset's
    split, or, for several datasets, their merge (rule merge)."""
    names = subset_datasets(subset)
    if not merged(subset):
        return dataset_files(names[0], split)
    return {
        "images": f"results/{subset}/data/{split}_images",
        "annotations": f"results/{subset}/data/{split}_merged.json",
    }


def dataset_split(wildcards):
    return subset_files(wildcards.subset, wildcards.split)


def split_annotations(wildcards):
    return dataset_split(wildcards)["annotations"]


def split_images(wildcards):
    return dataset_split(wildcards)["images"]


def source_annotations(wildcards):
    """The unfiltered training annotations (the whole file of a dataset given as one, the merge
    of several): they give the classes' original ids."""
    if merged(wildcards.subset):
        return subset_files(wildcards.subset, "train")["annotations"]
    dataset = config["datasets"][subset_datasets(wildcards.subset)[0]]
    return dataset["all" if "all" in dataset else "train"]["annotations"]


def subset_dataset_configs(wildcards):
    """Params function: each dataset a subset reads, as the config gives it (the model card)."""
    return {
        name: config["datasets"][name] for name in subset_datasets(wildcards.subset)
    }


def images_of_split(split):
    """Input function: the image folder of one split of the subset's data."""

    def lookup(wildcards):
        return subset_files(wildcards.subset, split)["images"]

    return lookup


def merge_inputs(wildcards):
    """The split's annotation files of the datasets a subset merges, in order."""
    return [
        dataset_files(name, wildcards.split)["annotations"]
        for name in subset_datasets(wildcards.subset)
    ]


def merge_other_split(wildcards):
    """The other split's annotation files of the merged datasets: an image of this split that
    another dataset names in the other split would leak between train and val."""
    other = "val" if wildcards.split == "train" else "train"
    return [
        dataset_files(name, other)["annotations"]
        for name in subset_datasets(wildcards.subset)
    ]


def merge_other_sources(wildcards):
    """Params function: (name, image folder) of each merged dataset's other split."""
    other = "val" if wildcards.split == "train" else "train"
    return [
        (name, dataset_files(name, other)["images"])
        for name in subset_datasets(wildcards.subset)
    ]


def merge_sources(wildcards):
    """Params function: (name, image folder, aliases) of each dataset a subset merges."""
    return [
        (
            name,
            dataset_files(name, wildcards.split)["images"],
            config["datasets"][name].get("aliases", {}),
        )
        for name in subset_datasets(wildcards.subset)
    ]


def val_split_setting(key):
    """Params function: `fraction` or `seed` of the dataset's val_split (defaults filled)."""

    def lookup(wildcards):
        return config["datasets"][wildcards.dataset]["val_split"][key]

    return lookup


def balance_mode_of(subset, split):
    """Balancing applies to the training split; val stays as filtered, for honest AP."""
    return config["subsets"][subset]["balance"] if split == "train" else "none"


def balance_mode(wildcards):
    return balance_mode_of(wildcards.subset, wildcards.split)


def script_code(script):
    """Hash of the package modules in the import closure of a rule's entry script
    (workflow/scripts/<script>.py): any change to code the job can run reruns it."""
    return code_hash(Path(workflow.basedir) / "workflow" / "scripts" / f"{script}.py")


def stats_inputs(wildcards):
    """Named inputs `<split>__<step>`, in display order."""
    names = subset_datasets(wildcards.subset)
    steps = {}
    for split in SPLITS:
        if merged(wildcards.subset):  # each dataset's own counts, then the merge's
            for name in names:
                steps[f"{split}__dataset_{name}"] = dataset_files(name, split)[
                    "annotations"
                ]
        steps[f"{split}__input"] = subset_files(wildcards.subset, split)["annotations"]
        steps[f"{split}__filtered"] = (
            f"results/{wildcards.subset}/data/{split}_filtered.json"
        )
        if balance_mode_of(wildcards.subset, split) != "none":
            steps[f"{split}__balanced"] = (
                f"results/{wildcards.subset}/data/{split}.json"
            )
    steps.update(repeat_input(wildcards))
    return steps


def repeat_input(wildcards):
    """Named input `train__repeat`: the repeat-factor file of a subset with balance: repeat."""
    if config["subsets"][wildcards.subset]["balance"] != "repeat":
        return {}
    return {
        "train__repeat": f"results/{wildcards.subset}/data/train_repeat_factors.json"
    }


def data_outputs(subset):
    outputs = [f"results/{subset}/data/{split}.json" for split in SPLITS]
    if config["subsets"][subset]["balance"] == "repeat":
        outputs.append(f"results/{subset}/data/train_repeat_factors.json")
    outputs += [f"results/{subset}/stats/counts.{ext}" for ext in ("csv", "png")]
    if config["subsets"][subset]["masks"]:
        outputs += [
            f"results/{subset}/{kind}/{split}"
            for kind in ("images", "masks")
            for split in SPLITS
        ]
    return outputs


def demo_test_outputs():
    """The demo's test split, when demo.test_images asks for one."""
    if not config["demo"]["test_images"]:
        return {}
    root = config["demo"]["root"]
    return {
        "test": f"{root}/annotations/instances_test.json",
        "test_images": directory(f"{root}/test"),
    }


def test_outputs(subset):
    """The served model's evaluation on the test split, when the subset has one."""
    if not subset_has_test(subset):
        return []
    return [
        f"results/{subset}/eval/test_{name}"
        for name in ("metrics.json", "per_class.csv")
    ]


def model_outputs(subset):
    return (
        experiment_outputs(subset)
        + test_outputs(subset)
        + [
            str(model_folder(subset).served),
            str(model_folder(subset).card),
            f"results/{subset}/eval/metrics.json",
            f"results/{subset}/eval/ap_table.html",
            f"results/{subset}/eval/predictions.png",
        ]
        + export_outputs(subset)
    )


def export_outputs(subset):
    """The contract of each export the config asks for (written once the export is verified)."""
    return [
        f"results/{subset}/export/{export_format}/contract.json"
        for export_format in config["export"]["formats"]
    ]


# The inference files, found once at parse time; the demo's are planned before they exist.
INFERENCE = InferencePlan(
    config["inference"]["images"],
    config["inference"]["videos"],
    demo_planned_files(
        config["demo"]["root"],
        {split: config["demo"][f"{split}_images"] for split in SPLITS},
    ),
)
INFERENCE_SHARDS = shards(INFERENCE.files, config["inference"]["shards"])
# The videos whose tracks are scored against ground truth: {name: MOT file}.
try:
    TRACKED = tracked_videos(INFERENCE.files, config["inference"])
except D2RetrainError as error:
    sys.exit(f"config: {error}")
# Per shard, an output lost since it ran (in any subset), relative to the inference folder.
LOST_OUTPUTS = lost_outputs(
    INFERENCE_SHARDS, [f"results/{subset}/inference" for subset in config["subsets"]]
)


def shard_outputs(shard):
    """The shard's declared outputs: its status file, written last (the list of the files it
    inferred), and the output it has lost since it ran, if any (`all` asks for it too, so the
    shard runs again). The per-file outputs are not declared one by one:
    Snakemake's planning costs inputs x outputs per job (README, "Planning at scale").
    """
    outputs = {"status": f"results/{{subset}}/inference/status/shard_{shard:02d}.json"}
    if LOST_OUTPUTS[shard] is not None:
        outputs["lost"] = f"results/{{subset}}/inference/{LOST_OUTPUTS[shard]}"
    return outputs


def shard_inputs(shard):
    """Input function: the model and the shard's files; waits for the demo data when
    the files are ones it writes."""
    files = INFERENCE_SHARDS[shard]

    def lookup(wildcards):
        if INFERENCE.waits_for_a_rule(files):
            checkpoints.demo_data.get()
        return {
            "weights": str(model_folder(wildcards.subset).served),
            "classes": str(model_folder(wildcards.subset).classes_file),
            "images": [item.path for item in files if item.kind == "image"],
            "videos": [item.path for item in files if item.kind == "video"],
        }

    return lookup


def inference_outputs(subset):
    """The run summary, and the outputs shards have lost since they ran: asked for here, so that
    Snakemake reruns those shards (it checks only the outputs that something asks for). `all`
    keeps no record of its inputs, so asking changes nothing once the files are back."""
    if not INFERENCE_SHARDS:
        return []
    lost = [
        f"results/{subset}/inference/{path}"
        for path in LOST_OUTPUTS.values()
        if path is not None and not Path(f"results/{subset}/inference/{path}").exists()
    ]
    return [
        f"results/{subset}/inference/summary.csv",
        f"results/{subset}/inference/predictions_coco.json",
        *([f"results/{subset}/inference/tracking.csv"] if TRACKED else []),
        *lost,
    ]


def all_outputs():
    return [
        path
        for subset in config["subsets"]
        for path in data_outputs(subset)
        + model_outputs(subset)
        + inference_outputs(subset)
    ]


def inference_params():
    """The inference settings a job depends on (the file lists are its inputs; the ground truth
    is track_eval's)."""
    return {
        key: value
        for key, value in config["inference"].items()
        if key not in ("images", "videos", "ground_truth")
    }


# Subsets whose evaluation covers a test split too (rules evaluate_with_test and
# evaluate_experiment_with_test), and those evaluated on val alone.
TESTED_PLAIN = one_of(n for n, v in EXPERIMENTS.items() if not v and subset_has_test(n))
UNTESTED_PLAIN = one_of(
    n for n, v in EXPERIMENTS.items() if not v and not subset_has_test(n)
)
TESTED_EXPERIMENT = one_of(
    n for n, v in EXPERIMENTS.items() if v and subset_has_test(n)
)
UNTESTED_EXPERIMENT = one_of(
    n for n, v in EXPERIMENTS.items() if v and not subset_has_test(n)
)
