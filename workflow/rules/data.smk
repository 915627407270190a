# Data preparation: demo data -> (split, merge) -> filter -> balance -> (images, masks) -> stats.


checkpoint demo_data:
    output:
        **demo_test_outputs(),
        train=f"{config['demo']['root']}/annotations/instances_train.json",
        val=f"{config['demo']['root']}/annotations/instances_val.json",
        train_images=directory(f"{config['demo']['root']}/train"),
        val_images=directory(f"{config['demo']['root']}/val"),
        video=f"{config['demo']['root']}/video/demo.mp4",
        video_ground_truth=f"{config['demo']['root']}/video/demo.gt.txt",
    log:
        "logs/demo_data.log",
    conda:
        "../../envs/d2retrain.yaml"
    resources:
        **CPU_JOB,
    params:
        seed=config["demo"]["seed"],
        train=config["demo"]["train_images"],
        val=config["demo"]["val_images"],
        video_frames=config["demo"]["video_frames"],
        test=config["demo"]["test_images"],
        code=script_code("demo_data"),
    script:
        "../scripts/demo_data.py"


rule split_dataset:
    input:
        lambda wildcards: config["datasets"][wildcards.dataset]["all"]["annotations"],
    output:
        train="results/splits/{dataset}/train.json",
        val="results/splits/{dataset}/val.json",
    log:
        "logs/splits/{dataset}.log",
    wildcard_constraints:
        dataset=NO_TEST_CUT,
    conda:
        "../../envs/d2retrain.yaml"
    resources:
        **CPU_JOB,
    params:
        fraction=val_split_setting("fraction"),
        seed=val_split_setting("seed"),
        code=script_code("split"),
    script:
        "../scripts/split.py"


use rule split_dataset as split_dataset_test with:
    output:
        train="results/splits/{dataset}/train.json",
        val="results/splits/{dataset}/val.json",
        test="results/splits/{dataset}/test.json",
    wildcard_constraints:
        dataset=TEST_CUT,
    params:
        test_fraction=val_split_setting("test_fraction"),


rule merge:
    input:
        annotations=merge_inputs,
        other_split=merge_other_split,
    output:
        json="results/{subset}/data/{split}_merged.json",
        images=directory("results/{subset}/data/{split}_images"),
    log:
        "logs/{subset}/merge_{split}.log",
    conda:
        "../../envs/d2retrain.yaml"
    threads: 4
    resources:
        **CPU_JOB,
    params:
        sources=merge_sources,
        other_split=merge_other_sources,
        code=script_code("merge"),
    script:
        "../scripts/merge.py"


rule filter:
    input:
        split_annotations,
    output:
        "results/{subset}/data/{split}_filtered.json",
    log:
        "logs/{subset}/filter_{split}.log",
    conda:
        "../../envs/d2retrain.yaml"
    threads: 2
    resources:
        **CPU_JOB,
    params:
        categories=subset_value("categories"),
        min_area=subset_value("min_area"),
        drop_crowd=subset_value("drop_crowd"),
        keep_empty_images=subset_value("keep_empty_images"),
        code=script_code("filter"),
    script:
        "../scripts/filter.py"


rule balance:
    input:
        "results/{subset}/data/{split}_filtered.json",
    output:
        "results/{subset}/data/{split}.json",
    log:
        "logs/{subset}/balance_{split}.log",
    conda:
        "../../envs/d2retrain.yaml"
    threads: 2
    resources:
        **CPU_JOB,
    params:
        mode=balance_mode,
        code=script_code("balance"),
    script:
        "../scripts/balance.py"


rule images_and_masks:
    input:
        annotations="results/{subset}/data/{split}.json",
        images=split_images,
    output:
        images=directory("results/{subset}/images/{split}"),
        masks=directory("results/{subset}/masks/{split}"),
    log:
        "logs/{subset}/images_and_masks_{split}.log",
    conda:
        "../../envs/d2retrain.yaml"
    threads: 4
    resources:
        **CPU_JOB,
    params:
        code=script_code("images_and_masks"),
    script:
        "../scripts/images_and_masks.py"


rule repeat_factors:
    input:
        "results/{subset}/data/train.json",
    output:
        "results/{subset}/data/train_repeat_factors.json",
    log:
        "logs/{subset}/repeat_factors.log",
    conda:
        "../../envs/d2retrain.yaml"
    resources:
        **CPU_JOB,
    params:
        threshold=subset_value("repeat_threshold"),
        code=script_code("repeat_factors"),
    script:
        "../scripts/repeat_factors.py"


rule stats:
    input:
        unpack(stats_inputs),
    output:
        csv="results/{subset}/stats/counts.csv",
        png=report(
            "results/{subset}/stats/counts.png",
            caption="../report/counts.rst",
            category="1. Data",
            subcategory="{subset}",
        ),
        checks=report(
            "results/{subset}/stats/data_checks.html",
            caption="../report/data_checks.rst",
            category="1. Data",
            subcategory="{subset}",
        ),
    log:
        "logs/{subset}/stats.log",
    conda:
        "../../envs/d2retrain.yaml"
    resources:
        **CPU_JOB,
    params:
        categories=subset_value("categories"),
        aliases=lambda wildcards: {
            name: config["datasets"][name].get("aliases", {})
            for name in subset_datasets(wildcards.subset)
        },
        image_dirs=lambda wildcards: {
            split: subset_files(wildcards.subset, split)["images"] for split in SPLITS
        },
        repeat_threshold=subset_value("repeat_threshold"),
        code=script_code("stats"),
    script:
        "../scripts/stats.py"
