"""Test set-up: kernels run compiled on a GPU when there is one, else under Triton's interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before
grpo_kernels is imported, so it is decided here, at the very top of the test session.
"""

import collections
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


# How CI installs verl for its tests (.ci/run): `.[dev]` cannot carry it, since verl 0.9.1 pins
# transformers<5.11 (installed with its dependencies, it would downgrade transformers).
VERL_INSTALL = ("pip install --no-deps verl==0.9.1 && pip install 'ray[default]>=2.41.0' "
                "'tensordict>=0.8.0,<=0.10.0,!=0.9.0' omegaconf codetiming")


def pytest_terminal_summary(terminalreporter):
    """Each skip reason once, with its count (``-q`` alone prints only "N skipped"), and how to run
    the verl tests when verl is missing."""
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        if isinstance(longrepr, tuple) and len(longrepr) == 3:
            reasons[str(longrepr[2]).removeprefix("Skipped: ")] += 1
    if not reasons:
        return
    terminalreporter.write_sep("-", f"{sum(reasons.values())} skipped, by reason")
    for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0])):
        terminalreporter.write_line(f"{count:4d} x {reason}")
    if any("verl is not installed" in reason or "No module named 'verl'" in reason for reason in reasons):
        terminalreporter.write_line(f"To run the verl tests, install verl as CI does: {VERL_INSTALL}")
