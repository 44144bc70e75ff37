# SWD and MS-SSIM of each stage (issue #4). Evaluation of stage R may run while stage 2R trains.


rule evaluate:
    input:
        unpack(res_inputs("evaluate")),
    output:
        paths.eval_json("{res}"),
    wildcard_constraints:
        res=r"\d+",
    params:
        values=res_params("evaluate"),
    resources:
        gpu=stage_gpus("evaluate"),
    log:
        "logs/evaluate_{res}.log",
    shell:
        gpu_shell("evaluate", per_res=True) + " 2>&1 | tee {log}"
