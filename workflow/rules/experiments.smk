# Experiments (subsets.<name>.experiments and grid): each variant trains and is evaluated in
# results/<subset>/experiments/<name>/ with the train, serve_model and evaluate rules' jobs; data
# steps run once per distinct data setting; select picks the best on val, and serve_selected makes
# it the subset's model (results/<subset>/model/), which every later rule reads.


use rule balance as balance_variant with:
    input:
        "results/{subset}/data/train_filtered.json",
    output:
        "results/{subset}/data/balance~{mode}/train.json",
    log:
        "logs/{subset}/balance~{mode}.log",
    wildcard_constraints:
        mode="|".join(allowed_values("subsets.*.balance")),
    params:
        mode=wildcard("mode"),


use rule repeat_factors as repeat_factors_variant with:
    input:
        repeat_source,
    output:
        "results/{subset}/data/balance~repeat/repeat_threshold~{threshold}.json",
    log:
        "logs/{subset}/repeat_threshold~{threshold}.log",
    wildcard_constraints:
        threshold=r"[0-9.e-]+",
    params:
        threshold=wildcard("threshold", float),


use rule train as train_experiment with:
    input:
        unpack(variant_data),
        unpack(weights_check_input),
        val="results/{subset}/data/val.json",
        source=source_annotations,
        train_images=images_of_split("train"),
        val_images=images_of_split("val"),
    output:
        final=str(EXPERIMENT.final_weights),
        classes=str(EXPERIMENT.classes_file),
        config=str(EXPERIMENT.config_file),
        metrics=str(EXPERIMENT.metrics),
        best=str(EXPERIMENT.best_file),
        loss=report(
            str(EXPERIMENT.loss_plot),
            caption="../report/loss.rst",
            category="2. Training",
            subcategory="{subset} {experiment}",
        ),
    log:
        "logs/{subset}/experiments/{experiment}/train.log",
    wildcard_constraints:
        subset=EXPERIMENT_SUBSET,
    resources:
        **GPU_JOB,
        gpu=variant_gpus,
    params:
        model=variant_setting("model"),
        train=variant_setting("train"),


use rule serve_model as serve_experiment with:
    input:
        final=str(EXPERIMENT.final_weights),
        classes=str(EXPERIMENT.classes_file),
        best=str(EXPERIMENT.best_file),
    output:
        served=str(EXPERIMENT.served),
    log:
        "logs/{subset}/experiments/{experiment}/serve_model.log",
    wildcard_constraints:
        subset=EXPERIMENT_SUBSET,


use rule evaluate as evaluate_experiment with:
    input:
        weights=str(EXPERIMENT.served),
        classes=str(EXPERIMENT.classes_file),
        val="results/{subset}/data/val.json",
        val_images=images_of_split("val"),
    output:
        metrics="results/{subset}/experiments/{experiment}/eval/metrics.json",
        per_class="results/{subset}/experiments/{experiment}/eval/per_class.csv",
    log:
        "logs/{subset}/experiments/{experiment}/evaluate.log",
    wildcard_constraints:
        subset=UNTESTED_EXPERIMENT,


use rule evaluate_experiment as evaluate_experiment_with_test with:
    input:
        weights=str(EXPERIMENT.served),
        classes=str(EXPERIMENT.classes_file),
        val="results/{subset}/data/val.json",
        val_images=images_of_split("val"),
        test="results/{subset}/data/test.json",
        test_images=images_of_split("test"),
    output:
        metrics="results/{subset}/experiments/{experiment}/eval/metrics.json",
        per_class="results/{subset}/experiments/{experiment}/eval/per_class.csv",
        test_metrics="results/{subset}/experiments/{experiment}/eval/test_metrics.json",
        test_per_class="results/{subset}/experiments/{experiment}/eval/test_per_class.csv",
    wildcard_constraints:
        subset=TESTED_EXPERIMENT,


checkpoint select:
    input:
        unpack(experiment_evaluations),
    output:
        selected="results/{subset}/selected.json",
        table="results/{subset}/experiments.csv",
        page=report(
            "results/{subset}/experiments.html",
            caption="../report/experiments.rst",
            category="3. Evaluation",
            subcategory="{subset}",
        ),
        plot=report(
            "results/{subset}/experiments.png",
            caption="../report/experiments.rst",
            category="3. Evaluation",
            subcategory="{subset}",
        ),
    log:
        "logs/{subset}/select.log",
    conda:
        "../../envs/d2retrain.yaml"
    resources:
        **CPU_JOB,
    params:
        folders=experiment_folders,
        overrides=variant_overrides,
        variants=variant_names,
        metric=subset_value("select"),
        code=script_code("select"),
    script:
        "../scripts/select.py"


# The selected variant's files under the subset's model/ and eval/, as copies (Snakemake touches
# outputs, and a touched hard link would touch the variant's files): reruns when the selection
# changes or the selected variant is retrained, and not otherwise.
rule serve_selected:
    input:
        unpack(selected_files),
    output:
        served=str(MODEL.served),
        classes=str(MODEL.classes_file),
        config=str(MODEL.config_file),
        best=str(MODEL.best_file),
        metrics_log=str(MODEL.metrics),
        loss=str(MODEL.loss_plot),
        metrics="results/{subset}/eval/metrics.json",
        per_class="results/{subset}/eval/per_class.csv",
    log:
        "logs/{subset}/serve_selected.log",
    wildcard_constraints:
        subset=EXPERIMENT_SUBSET,
    conda:
        "../../envs/d2retrain.yaml"
    resources:
        **CPU_JOB,
    params:
        code=script_code("serve_selected"),
    script:
        "../scripts/serve_selected.py"


# The selected variant's test evaluation as the subset's (a plain subset's is evaluate_with_test's).
use rule serve_selected as serve_selected_test with:
    input:
        unpack(selected_test_files),
    output:
        metrics="results/{subset}/eval/test_metrics.json",
        per_class="results/{subset}/eval/test_per_class.csv",
    log:
        "logs/{subset}/serve_selected_test.log",
