"""Benchmark smoke set-up: like tests/conftest.py, our Triton kernels run under the interpreter
when there is no GPU. TRITON_INTERPRET must be set before grpo_kernels (and triton) is imported,
whichever directory pytest collects first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
