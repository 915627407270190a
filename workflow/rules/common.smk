# Config lookups and path helpers; no logic beyond that.
import hashlib
from pathlib import Path

SRC = Path(workflow.basedir) / "src" / "d2retrain"
SPLITS = ["train", "val"]


wildcard_constraints:
    subset="|".join(config["subsets"]),
    split="|".join(SPLITS),


def subset_config(wildcards):
    return config["subsets"][wildcards.subset]


def subset_value(key):
    """Input/params function returning one key of the subset's config."""

    def lookup(wildcards):
        return subset_config(wildcards)[key]

    return lookup


def dataset_split(wildcards):
    dataset = config["datasets"][subset_config(wildcards)["dataset"]]
    return dataset[wildcards.split]


def split_annotations(wildcards):
    return dataset_split(wildcards)["annotations"]


def split_images(wildcards):
    return dataset_split(wildcards)["images"]


def source_annotations(wildcards):
    """The unfiltered training annotations: they give the classes' original ids."""
    return config["datasets"][subset_config(wildcards)["dataset"]]["train"][
        "annotations"
    ]


def images_of_split(split):
    """Input function: the image folder of one split of the subset's dataset."""

    def lookup(wildcards):
        return config["datasets"][subset_config(wildcards)["dataset"]][split]["images"]

    return lookup


def balance_mode_of(subset, split):
    """Balancing applies to the training split; val stays as filtered, for honest AP."""
    return config["subsets"][subset]["balance"] if split == "train" else "none"


def balance_mode(wildcards):
    return balance_mode_of(wildcards.subset, wildcards.split)


def code_version(*modules):
    """Hash of the package modules a rule runs, so a code change reruns it."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update((SRC / f"{module}.py").read_bytes())
    return digest.hexdigest()[:16]


def stats_inputs(wildcards):
    """Named inputs `<split>__<step>`, in display order."""
    dataset = config["datasets"][subset_config(wildcards)["dataset"]]
    steps = {}
    for split in SPLITS:
        steps[f"{split}__input"] = dataset[split]["annotations"]
        steps[f"{split}__filtered"] = (
            f"results/{wildcards.subset}/data/{split}_filtered.json"
        )
        if balance_mode_of(wildcards.subset, split) != "none":
            steps[f"{split}__balanced"] = (
                f"results/{wildcards.subset}/data/{split}.json"
            )
    return steps


def data_outputs(subset):
    outputs = [f"results/{subset}/data/{split}.json" for split in SPLITS]
    outputs += [f"results/{subset}/stats/counts.{ext}" for ext in ("csv", "png")]
    if config["subsets"][subset]["masks"]:
        outputs += [
            f"results/{subset}/{kind}/{split}"
            for kind in ("images", "masks")
            for split in SPLITS
        ]
    return outputs


def model_outputs(subset):
    return [
        f"results/{subset}/model/model_final.pth",
        f"results/{subset}/eval/metrics.json",
    ]


def all_outputs():
    return [
        path
        for subset in config["subsets"]
        for path in data_outputs(subset) + model_outputs(subset)
    ]
