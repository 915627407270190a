# Report assets: the AP table and a grid of val predictions; `snakemake --report` gathers them
# with the outputs marked report() in the other stages.


rule ap_table:
    input:
        unpack(after_selection),
        metrics="results/{subset}/eval/metrics.json",
        per_class="results/{subset}/eval/per_class.csv",
    output:
        report(
            "results/{subset}/eval/ap_table.html",
            caption="../report/ap_table.rst",
            category="3. Evaluation",
            subcategory="{subset}",
        ),
    log:
        "logs/{subset}/ap_table.log",
    conda:
        "../../envs/d2retrain.yaml"
    resources:
        **CPU_JOB,
    params:
        code=script_code("ap_table"),
    script:
        "../scripts/ap_table.py"


rule prediction_grid:
    input:
        unpack(after_selection),
        weights=str(MODEL.served),
        classes=str(MODEL.classes_file),
        val="results/{subset}/data/val.json",
        val_images=images_of_split("val"),
    output:
        report(
            "results/{subset}/eval/predictions.png",
            caption="../report/predictions.rst",
            category="3. Evaluation",
            subcategory="{subset}",
        ),
    log:
        "logs/{subset}/prediction_grid.log",
    conda:
        "../../envs/d2retrain.yaml"
    threads: 2
    resources:
        **GPU_JOB,
        gpu=1,
    params:
        categories=subset_value("categories"),
        device=config["train"]["device"],
        score_threshold=config["inference"]["score_threshold"],
        code=script_code("prediction_grid"),
    script:
        "../scripts/prediction_grid.py"


rule model_card:
    input:
        unpack(after_selection),
        weights=str(MODEL.served),
        classes=str(MODEL.classes_file),
        config=str(MODEL.config_file),
        best=str(MODEL.best_file),
        metrics_log=str(MODEL.metrics),
        metrics="results/{subset}/eval/metrics.json",
        per_class="results/{subset}/eval/per_class.csv",
        counts="results/{subset}/stats/counts.csv",
        train=card_train_data,
        val="results/{subset}/data/val.json",
    output:
        card=str(MODEL.card),
        html=report(
            str(MODEL.card_html),
            caption="../report/model_card.rst",
            category="5. Model card",
            subcategory="{subset}",
        ),
    log:
        "logs/{subset}/model_card.log",
    conda:
        "../../envs/d2retrain.yaml"
    resources:
        **CPU_JOB,
    params:
        datasets=subset_dataset_configs,
        code=script_code("model_card"),
    script:
        "../scripts/model_card.py"
