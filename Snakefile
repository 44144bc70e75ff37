# progan-pipeline, Snakemake front end. The DAG itself is described once, in src/progan/pipeline/ (STAGES);
# workflow/rules/stages.smk makes one rule per stage from it (dvc.yaml is generated from the same table).
#   snakemake --cores all --resources gpu=8
import os
import socket
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")

REPO = Path(workflow.basedir).resolve()  # the checkout; source files are inputs so code edits re-run stages

# A cluster job runs this file again on its node, in the same folder and with the same python: say so in one line
# when that node does not see the project folder or the venv (on a cluster both must be on a shared file system).
if not Path("params.yaml").is_file():
    raise WorkflowError(f"no params.yaml in {Path.cwd()} on host {socket.gethostname()}: snakemake runs in the project "
                        f"folder, and on a cluster every node must see that folder (a shared file system)")
try:
    import progan
except ImportError as err:
    raise WorkflowError(f"{sys.executable} on host {socket.gethostname()} cannot import progan ({err}): run snakemake "
                        f"from the project's venv (`make install`); on a cluster every node must see it") from None
# Stage commands run `progan`: the one beside this python, also when the venv is not activated.
_VENV_BIN = os.path.dirname(sys.executable)
if os.path.exists(os.path.join(_VENV_BIN, "progan")) and os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")


configfile: "params.yaml"


report: "workflow/report/workflow.rst"  # `snakemake --report report.zip`: the outputs marked in the stage table


include: "workflow/rules/common.smk"
include: "workflow/rules/stages.smk"


rule all:
    default_target: True
    input:
        [path for job in pipeline.jobs(PARAMS) for path in job.out_paths],
