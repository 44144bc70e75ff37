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
