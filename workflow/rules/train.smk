# One training job per growth stage (issue #3): `snakemake -n` shows train for res=4, 8, ..., crop.size.
# Each resumes from the previous stage's checkpoint (an input) and reads its own pyramid level.


rule train:
    input:
        unpack(res_inputs("train")),
    output:
        checkpoint=paths.checkpoint("{res}"),
        losses=paths.losses_tsv("{res}"),
        samples=paths.samples_png("{res}"),
        summary=paths.train_json("{res}"),
    wildcard_constraints:
        res=r"\d+",
    params:
        values=res_params("train"),
    resources:
        gpu=stage_gpus("train"),
    log:
        "logs/train_{res}.log",
    shell:
        gpu_shell("train", per_res=True) + " 2>&1 | tee {log}"
