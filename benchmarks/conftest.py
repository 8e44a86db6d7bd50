"""Benchmark smoke set-up: like tests/conftest.py, our Triton kernels run under the interpreter
when there is no GPU. TRITON_INTERPRET must be set before grpo_kernels (and triton) is imported,
whichever directory pytest collects first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """``--benchmark-enable`` / ``--benchmark-only`` run on one process: pytest.ini's ``-n 2`` (xdist)
    would make pytest-benchmark turn timing off, and refuse ``--benchmark-only`` (exit status 4)."""
    if config.getoption("benchmark_enable", False) or config.getoption("benchmark_only", False):
        if getattr(config.option, "numprocesses", None):
            config.option.numprocesses = 0
            config.option.dist = "no"
