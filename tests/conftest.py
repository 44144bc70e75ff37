import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# TensorFlow (imported by the MTCNN reference tests) and triton (imported by torch._dynamo, which torch.optim
# pulls in on first use) crash with a segfault when TensorFlow comes first in one process. Under pytest-xdist a
# worker may run the TF tests before any training test, so load torch._dynamo up front.
import torch._dynamo  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    """The two end-to-end DAG tests (~6 min each) first: with `-n 2 --dist loadgroup` (make test) each starts at
    once on its own worker and the short tests fill in around them."""
    def is_e2e(item):
        return any(m.args and str(m.args[0]).startswith("e2e_") for m in item.iter_markers("xdist_group"))

    items.sort(key=lambda item: not is_e2e(item))
