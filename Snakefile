# progan-pipeline, Snakemake front end. The DAG itself is described once, in src/progan/pipeline.py;
# the rules in workflow/rules/ are built from it (dvc.yaml is generated from the same table).
#   snakemake --cores all --resources gpu=8
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

REPO = Path(workflow.basedir).resolve()  # the checkout; source files are inputs so code edits re-run stages


configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
        expand(paths.eval_json("{res}"), res=PARAMS.resolutions),
