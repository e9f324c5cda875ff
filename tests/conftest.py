import os
import socket
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # parallel workers (scripts/test.sh): one thread each, and one for the processes they start
    torch.set_num_threads(1)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tiny base and shapes set are built once per checkout, not in the user's ~/.cache/pmod
os.environ.setdefault(
    "PMOD_CACHE",
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "pmod-tests"
    ),
)


@pytest.fixture
def free_port() -> int:
    """A TCP port no process listens on now, for a process group's rendezvous: fixed ports collide
    between parallel workers and between test runs on one machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA GPU: skipped where torch sees none
    (scripts/gpu_check.sh runs them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
