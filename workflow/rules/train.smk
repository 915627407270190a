# Training and evaluation: one model per subset, resumable, evaluated on the subset's val split.
# Base weights are loaded once first (check_weights, priority: a bad setting fails in seconds,
# while the data jobs need not wait for it).


rule check_weights:
    output:
        "results/{subset}/checks/weights.json",
    log:
        "logs/{subset}/check_weights.log",
    priority: 100
    conda:
        "../../envs/d2retrain.yaml"
    resources:
        **CPU_JOB,
    params:
        categories=subset_value("categories"),
        model=config["model"],
        code=script_code("check_weights"),
    script:
        "../scripts/check_weights.py"


rule train:
    input:
        unpack(repeat_input),
        unpack(weights_check_input),
        train="results/{subset}/data/train.json",
        val="results/{subset}/data/val.json",
        source=source_annotations,
        train_images=images_of_split("train"),
        val_images=images_of_split("val"),
    output:
        final=str(MODEL.final_weights),
        classes=str(MODEL.classes_file),
        config=str(MODEL.config_file),
        metrics=str(MODEL.metrics),
        best=str(MODEL.best_file),
        loss=report(
            str(MODEL.loss_plot),
            caption="../report/loss.rst",
            category="2. Training",
            subcategory="{subset}",
        ),
    log:
        "logs/{subset}/train.log",
    wildcard_constraints:
        subset=PLAIN_SUBSET,
    conda:
        "../../envs/d2retrain.yaml"
    threads: 8
    resources:
        **GPU_JOB,
        gpu=config["train"]["num_gpus"],
    params:
        categories=subset_value("categories"),
        model=config["model"],
        train=config["train"],
        code=script_code("train"),
    script:
        "../scripts/train.py"


# The served weights: a hard link to the weights training kept (train.keep), under the one name
# every later rule reads. Deleted, it is served again in a second, without training.
rule serve_model:
    input:
        final=str(MODEL.final_weights),
        classes=str(MODEL.classes_file),
        best=str(MODEL.best_file),
    output:
        served=str(MODEL.served),
    log:
        "logs/{subset}/serve_model.log",
    wildcard_constraints:
        subset=PLAIN_SUBSET,
    conda:
        "../../envs/d2retrain.yaml"
    resources:
        **CPU_JOB,
    params:
        code=script_code("serve_model"),
    script:
        "../scripts/serve_model.py"


rule evaluate:
    input:
        weights=str(MODEL.served),
        classes=str(MODEL.classes_file),
        val="results/{subset}/data/val.json",
        val_images=images_of_split("val"),
    output:
        metrics="results/{subset}/eval/metrics.json",
        per_class="results/{subset}/eval/per_class.csv",
    log:
        "logs/{subset}/evaluate.log",
    wildcard_constraints:
        subset=UNTESTED_PLAIN,
    conda:
        "../../envs/d2retrain.yaml"
    threads: 4
    resources:
        **GPU_JOB,
        gpu=1,
    params:
        categories=subset_value("categories"),
        device=config["train"]["device"],
        score_threshold=config["inference"]["score_threshold"],
        code=script_code("evaluate"),
    script:
        "../scripts/evaluate.py"


# With a test split, the served model's AP on it too, in the same job (the model loaded once): never
# used to train or to select. For a subset with experiments, serve_selected_test copies the
# selected variant's.
use rule evaluate as evaluate_with_test with:
    input:
        weights=str(MODEL.served),
        classes=str(MODEL.classes_file),
        val="results/{subset}/data/val.json",
        val_images=images_of_split("val"),
        test="results/{subset}/data/test.json",
        test_images=images_of_split("test"),
    output:
        metrics="results/{subset}/eval/metrics.json",
        per_class="results/{subset}/eval/per_class.csv",
        test_metrics="results/{subset}/eval/test_metrics.json",
        test_per_class="results/{subset}/eval/test_per_class.csv",
    wildcard_constraints:
        subset=TESTED_PLAIN,
