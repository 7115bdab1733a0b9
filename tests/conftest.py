"""Test setup: the `cuda` and `interpret` markers, and the `fresh_dynamo` fixture.

Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter; the variable must be
set before any kernel module is imported, which is why it is set here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run with `pytest -m cuda` on one)")
    no_interp = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "interpret" in item.keywords and not INTERPRETING:
            item.add_marker(no_interp)


@pytest.fixture
def fresh_dynamo():
    """A clean torch._dynamo state before and after a compile test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
