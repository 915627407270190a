# Inference: each subset's model on the configured images and videos. Files are split into
# stable shards (a hash of their names); one job per shard loads the model once and declares
# one status file, not an output per file (planning stays linear in the files).


for shard in INFERENCE_SHARDS:

    rule:
        name:
            f"infer_{shard:02d}"
        input:
            unpack(after_selection),
            unpack(shard_inputs(shard)),
        output:
            **shard_outputs(shard),
        log:
            f"logs/{{subset}}/infer_{shard:02d}.log",
        conda:
            "../../envs/d2retrain.yaml"
        threads: 4
        resources:
            **GPU_JOB,
            gpu=1,
            # sized for shards of ~1,000 COCO-sized images (inference.shards: auto); a profile's
            # set-resources may override them per shard rule
            mem_mb=16000,
            runtime=120,
        params:
            categories=subset_value("categories"),
            options=inference_params(),
            code=script_code("infer"),
        script:
            "../scripts/infer.py"


rule inference_summary:
    input:
        unpack(after_selection),
        status=expand(
            "results/{{subset}}/inference/status/shard_{shard:02d}.json",
            shard=INFERENCE_SHARDS,
        ),
        classes=str(MODEL.classes_file),
    output:
        coco="results/{subset}/inference/predictions_coco.json",
        csv=report(
            "results/{subset}/inference/summary.csv",
            caption="../report/inference_summary.rst",
            category="4. Inference",
            subcategory="{subset}",
        ),
        drawn=report(
            directory("results/{subset}/inference/drawn"),
            patterns=["{kind}/{file}.{ext}"],
            caption="../report/inference_file.rst",
            category="4. Inference",
            subcategory="{subset}",
            labels={"file": "{file}", "kind": "{kind}"},
        ),
    log:
        "logs/{subset}/inference_summary.log",
    conda:
        "../../envs/d2retrain.yaml"
    resources:
        **CPU_JOB,
    params:
        code=script_code("inference_summary"),
    script:
        "../scripts/inference_summary.py"


rule track_eval:
    input:
        unpack(after_selection),
        summary="results/{subset}/inference/summary.csv",
        ground_truth=list(TRACKED.values()),
    output:
        report(
            "results/{subset}/inference/tracking.csv",
            caption="../report/tracking.rst",
            category="4. Inference",
            subcategory="{subset}",
        ),
    log:
        "logs/{subset}/track_eval.log",
    conda:
        "../../envs/d2retrain.yaml"
    resources:
        **CPU_JOB,
    params:
        videos=TRACKED,
        code=script_code("track_eval"),
    script:
        "../scripts/track_eval.py"
