"""Shared fixtures: the backend list and how each one is skipped or required.

Set REATTENTION_REQUIRE=cpu,triton (CI does) to turn a skip of those backends into a
failure, so a broken build can never pass as "skipped". On a machine without a GPU the
Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here unless given).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when the kernels are decorated, so before reattention imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from reattention import ops  # noqa: E402

PARITY_BACKENDS = ["reference", "cpu", "triton", "cuda"]

# A C++ exception raised inside a stable-ABI kernel (STD_TORCH_CHECK) crashed the process with a
# segfault under torch 2.11 on the GPU box, while 2.13 and 2.14 turn it into a RuntimeError.
# The public API validates in Python first, so only direct torch.ops calls with bad input reach
# those checks; tests that provoke them run where the error path works.
_torch_version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
needs_cpp_error_path = pytest.mark.skipif(
    _torch_version < (2, 13),
    reason="C++ exceptions from stable-ABI kernels crash torch < 2.13 (seen on 2.11)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def device_for(backend: str) -> str:
    """The device a backend's parity test runs on; skips "cuda" on a machine without one."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("the cuda backend needs a CUDA device")
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def require(backend: str, like: torch.Tensor) -> None:
    """Skip (or fail, when required) if ``backend`` cannot run tensors like ``like``."""
    why = ops._kernel_refusal(backend, like)
    if why is None:
        return
    required = os.environ.get("REATTENTION_REQUIRE", "").split(",")
    # A head dim or dtype a kernel does not support is a legitimate skip; an absent
    # backend that CI requires is a failure.
    unsupported = ("head dims" in why) or ("takes float16" in why) or ("float64" in why)
    if backend in required and not unsupported:
        pytest.fail(f"backend {backend!r} is required but unavailable: {why}")
    pytest.skip(why)
