# The HTML report over every stage (issue #4).


rule report:
    input:
        data=pipeline.stage(PARAMS, "report").deps,
        code=stage_code("report"),
    output:
        html=paths.REPORT_HTML,
        swd=paths.REPORT_SWD_PLOT,
        losses=paths.REPORT_LOSS_PLOT,
    params:
        values=stage_params("report"),
    log:
        "logs/report.log",
    shell:
        stage_shell("report") + " 2>&1 | tee {log}"
