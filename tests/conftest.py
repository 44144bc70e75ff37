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


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def no_inception_download(tmp_path_factory, monkeypatch):
    """No test downloads the Inception weights (FID/KID/IS) or finds a real copy: an empty cache folder and a
    mirror URL on a closed local port (both inherited by the subprocesses tests start). Tests that fetch serve
    their own file (tests/test_inception.py); the others use helpers.standin_inception."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PROGAN_INCEPTION_URL", f"http://127.0.0.1:{port}/weights-inception-2015-12-05-6726825d.pth")
    monkeypatch.setenv("PROGAN_CACHE_DIR", str(tmp_path_factory.mktemp("inception-cache")))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
