# Training and evaluation: one model per subset, resumable, evaluated on the subset's val split.


rule train:
    input:
        unpack(repeat_input),
        train="results/{subset}/data/train.json",
        val="results/{subset}/data/val.json",
        source=source_annotations,
        train_images=images_of_split("train"),
        val_images=images_of_split("val"),
    output:
        weights="results/{subset}/model/model_final.pth",
        classes="results/{subset}/model/classes.json",
        config="results/{subset}/model/config.yaml",
        metrics="results/{subset}/model/metrics.jsonl",
        best="results/{subset}/model/best.json",
        loss=report(
            "results/{subset}/model/loss.png",
            caption="../report/loss.rst",
            category="2. Training",
            subcategory="{subset}",
        ),
    log:
        "logs/{subset}/train.log",
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


rule evaluate:
    input:
        weights="results/{subset}/model/model_final.pth",
        classes="results/{subset}/model/classes.json",
        val="results/{subset}/data/val.json",
        val_images=images_of_split("val"),
    output:
        metrics="results/{subset}/eval/metrics.json",
        per_class="results/{subset}/eval/per_class.csv",
    log:
        "logs/{subset}/evaluate.log",
    conda:
        "../../envs/d2retrain.yaml"
    threads: 4
    resources:
        **GPU_JOB,
        gpu=1,
    params:
        categories=subset_value("categories"),
        device=config["train"]["device"],
        code=script_code("evaluate"),
    script:
        "../scripts/evaluate.py"
