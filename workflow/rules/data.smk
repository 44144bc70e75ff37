# download -> crop -> pyramid (issue #2). Commands, inputs and params come from the stage table.


rule download:
    input:
        code=stage_code("download"),
    output:
        paths.IMAGES_LIST,
    params:
        values=stage_params("download"),
    log:
        "logs/download.log",
    shell:
        stage_shell("download") + " 2>&1 | tee {log}"


rule crop:
    input:
        images=rules.download.output[0],
        code=stage_code("crop"),
    output:
        directory(paths.FACES_DIR),
    params:
        values=stage_params("crop"),
    resources:
        gpu=stage_gpus("crop"),
    log:
        "logs/crop.log",
    shell:
        gpu_shell("crop") + " 2>&1 | tee {log}"


rule pyramid:
    input:
        faces=rules.crop.output[0],
        code=stage_code("pyramid"),
    output:
        levels=[paths.pyramid_level(r) for r in PARAMS.resolutions],
        info=paths.PYRAMID_INFO,
    params:
        values=stage_params("pyramid"),
    log:
        "logs/pyramid.log",
    shell:
        stage_shell("pyramid") + " 2>&1 | tee {log}"
