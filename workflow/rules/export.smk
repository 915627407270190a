# Export (opt-in, config key `export.formats`): each subset's model as ONNX or TorchScript with its
# contract, verified on the subset's val split against the evaluation's AP before it is usable.


rule export:
    input:
        unpack(after_selection),
        weights=str(MODEL.served),
        classes=str(MODEL.classes_file),
        metrics="results/{subset}/eval/metrics.json",
        val="results/{subset}/data/val.json",
        val_images=images_of_split("val"),
    output:
        model="results/{subset}/export/{format}/model.{format}",
        verify="results/{subset}/export/{format}/verify.json",
        contract="results/{subset}/export/{format}/contract.json",
    log:
        "logs/{subset}/export_{format}.log",
    conda:
        "../../envs/d2retrain.yaml"
    threads: 4
    resources:
        **CPU_JOB,
    params:
        code=script_code("export"),
    script:
        "../scripts/export.py"
