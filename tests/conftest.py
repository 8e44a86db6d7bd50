"""Test set-up: kernels run compiled on a GPU when there is one, else under Triton's interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before
grpo_kernels is imported, so it is decided here, at the very top of the test session.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A fresh, reported seed per test: inputs differ between runs, yet a failure can be replayed
    # with GRPO_KERNELS_SEED=<seed>.
    seed = int(os.environ.get("GRPO_KERNELS_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"\n[seed] {request.node.nodeid}: GRPO_KERNELS_SEED={seed}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
