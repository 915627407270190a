# Config lookups and path helpers of the experiments (rules in experiments.smk); no logic beyond that.


def variant_of(wildcards):
    return EXPERIMENTS[wildcards.subset][wildcards.experiment]


def variant_setting(key):
    """Params function: one attribute of the variant (its resolved model or train section)."""

    def lookup(wildcards):
        return getattr(variant_of(wildcards), key)

    return lookup


def variant_gpus(wildcards):
    return variant_of(wildcards).train["num_gpus"]


def variant_data(wildcards):
    """Named inputs `train` (and `train__repeat`): the variant's training data."""
    train, repeat = variant_of(wildcards).data_files(
        config["subsets"][wildcards.subset]
    )
    folder = f"results/{wildcards.subset}/data"
    return {"train": f"{folder}/{train}"} | (
        {"train__repeat": f"{folder}/{repeat}"} if repeat else {}
    )


def repeat_source(wildcards):
    """The balance: repeat training data a variant's repeat factors are counted on."""
    own = config["subsets"][wildcards.subset]["balance"] == "repeat"
    folder = f"results/{wildcards.subset}/data"
    return f"{folder}/train.json" if own else f"{folder}/balance~repeat/train.json"


def wildcard(name, kind=str):
    """Params function: a wildcard's value, as `kind`."""

    def lookup(wildcards):
        return kind(wildcards[name])

    return lookup


def experiment_folders(wildcards):
    """Params function: {experiment: its folder}, in the config's order."""
    return {
        name: f"results/{wildcards.subset}/experiments/{name}"
        for name in EXPERIMENTS[wildcards.subset]
    }


def variant_overrides(wildcards):
    """Params function: {experiment: its overrides}."""
    return {name: v.overrides for name, v in EXPERIMENTS[wildcards.subset].items()}


def variant_names(wildcards):
    """Params function: {experiment: the variant it is a seed of}."""
    return {name: v.variant for name, v in EXPERIMENTS[wildcards.subset].items()}


def experiment_evaluations(wildcards):
    """Every variant's val evaluation, training record and curves (select reads them all)."""
    names = list(EXPERIMENTS[wildcards.subset])
    folder = f"results/{wildcards.subset}/experiments"
    return {
        "val": [f"{folder}/{name}/eval/metrics.json" for name in names],
        "best": [f"{folder}/{name}/model/best.json" for name in names],
        "curves": [f"{folder}/{name}/model/metrics.jsonl" for name in names],
        "test": [
            f"{folder}/{name}/eval/test_metrics.json"
            for name in names
            if subset_has_test(wildcards.subset)
        ],
    }


def selected_experiment(subset):
    """The variant select picked for a subset (once select has run)."""
    selected = checkpoints.select.get(subset=subset).output.selected
    return json.loads(Path(selected).read_text())["experiment"]


def selected_files(wildcards):
    """The selected variant's files, named as serve_selected's outputs (after select ran)."""
    name = selected_experiment(wildcards.subset)
    folder = ModelFolder(f"results/{wildcards.subset}/experiments/{name}/model")
    evaluation = f"results/{wildcards.subset}/experiments/{name}/eval"
    return {
        "served": str(folder.served),
        "classes": str(folder.classes_file),
        "config": str(folder.config_file),
        "best": str(folder.best_file),
        "metrics_log": str(folder.metrics),
        "loss": str(folder.loss_plot),
        "metrics": f"{evaluation}/metrics.json",
        "per_class": f"{evaluation}/per_class.csv",
    }


def selected_test_files(wildcards):
    """The selected variant's test evaluation, named as serve_selected_test's outputs."""
    name = selected_experiment(wildcards.subset)
    evaluation = f"results/{wildcards.subset}/experiments/{name}/eval"
    return {
        "metrics": f"{evaluation}/test_metrics.json",
        "per_class": f"{evaluation}/test_per_class.csv",
    }


def after_selection(wildcards):
    """Input function of each job reading a subset's model, returning no input; for a subset with
    experiments it waits for select. When select reruns, Snakemake then decides afresh whether the
    job needs to run (the selection and the served files unchanged: it does not), which it does only
    for the jobs that depend on the checkpoint themselves."""
    if EXPERIMENTS[wildcards.subset]:
        checkpoints.select.get(subset=wildcards.subset)
    return {}


def card_train_data(wildcards):
    """The training data the served model was trained on: the subset's, or the selected variant's."""
    if not EXPERIMENTS[wildcards.subset]:
        return f"results/{wildcards.subset}/data/train.json"
    name = selected_experiment(wildcards.subset)
    train, _ = EXPERIMENTS[wildcards.subset][name].data_files(
        config["subsets"][wildcards.subset]
    )
    return f"results/{wildcards.subset}/data/{train}"


def experiment_outputs(subset):
    """A subset's comparison and selection (none without experiments)."""
    if not EXPERIMENTS[subset]:
        return []
    return [
        f"results/{subset}/{name}"
        for name in ("selected.json", "experiments.csv", "experiments.html")
    ]
