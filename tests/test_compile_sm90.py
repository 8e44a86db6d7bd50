"""Kernel configurations compile for H100 (sm_90): no compile error, no register spill, shared
memory within the H100 limit. Runs the real Triton compiler on this CPU-only machine
(grpo_kernels.ops.sm90_check), in a subprocess without TRITON_INTERPRET.

The suite compiles, per kernel and dtype, the heaviest configuration (most switches on); CI
(`.ci/run`) and the GPU kit compile every shipped configuration with the same module, before the
suite (some 550 compiles: minutes with a cold Triton cache on 2 cores)."""

import os
import re
import subprocess
import sys

import pytest

from grpo_kernels.ops.sm90_check import SPEC_MODULES


@pytest.mark.parametrize("module", SPEC_MODULES)
def test_heaviest_kernel_configs_compile_for_sm90(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "grpo_kernels.ops.sm90_check", "--module", module, "--heaviest-per-kernel"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    print(result.stdout[-5000:], result.stderr[-5000:])
    assert result.returncode == 0, f"sm_90 compile check failed:\n{result.stdout[-5000:]}\n{result.stderr[-3000:]}"
    assert " 0 failed" in result.stdout


def test_workspace_backward_has_no_atomics():
    # The full check above fails on an atomic in a spec not marked float_atomics; this shows the
    # PTX scan sees atomics where there are some (the atomic backward), so that the check can fail,
    # and none in the default backward's d-logits kernel (the GEMMs after it are cuBLAS's).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    counts = {}
    for name in ("logprobs_bwd_atomic[bf16,bias=True,softcap=True,entropy=True,dH=True,dW=False]",
                 "logprobs_dlogits[bf16,bias=True,softcap=True,entropy=True]"):
        result = subprocess.run(
            [sys.executable, "-m", "grpo_kernels.ops.sm90_check", "--module", "grpo_kernels.ops.logprobs.specs",
             "--filter", name], env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        counts[name] = [int(m) for m in re.findall(r"atomics=(\d+)", result.stdout)]
        assert len(counts[name]) == 2, result.stdout  # aligned and unaligned
    atomic, workspace = counts.values()
    assert min(atomic) > 0
    assert workspace == [0, 0]
