# Inference: each subset's model on the configured images and videos. Files are split into
# stable shards (a hash of their names); one job per shard loads the model once.


for shard in INFERENCE_SHARDS:

    rule:
        name:
            f"infer_{shard:02d}"
        input:
            unpack(shard_inputs(shard)),
        output:
            shard_outputs(shard),
            status=f"results/{{subset}}/inference/status/shard_{shard:02d}.json",
        log:
            f"logs/{{subset}}/infer_{shard:02d}.log",
        conda:
            "../../envs/d2retrain.yaml"
        threads: 4
        resources:
            **GPU_JOB,
            gpu=1,
        params:
            categories=subset_value("categories"),
            options=inference_params(),
            code=script_code("infer"),
        script:
            "../scripts/infer.py"


rule inference_summary:
    input:
        expand(
            "results/{{subset}}/inference/status/shard_{shard:02d}.json",
            shard=INFERENCE_SHARDS,
        ),
    output:
        report(
            "results/{subset}/inference/summary.csv",
            caption="../report/inference_summary.rst",
            category="4. Inference",
            subcategory="{subset}",
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
