"""The Triton CPU interpreter with numpy >= 2.3 (grpo_kernels/_triton_compat.py).

CI installs a numpy >= 2.3 into a side directory named by GRPO_KERNELS_NEW_NUMPY (the main
environment keeps the numpy the rest of the suite uses); a kernel then runs in a subprocess that
sees that numpy first.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import grpo_kernels
from grpo_kernels import _triton_compat
from grpo_kernels.reference import token_logprobs_reference

_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy, torch
    import grpo_kernels as gk
    from grpo_kernels.reference import token_logprobs_reference
    assert tuple(map(int, numpy.__version__.split(".")[:2])) >= (2, 3), numpy.__version__
    torch.manual_seed(0)
    h, w = torch.randn(7, 19), torch.randn(37, 19)
    t = torch.randint(0, 37, (7,))
    got = gk.token_logprobs(h, w, t, backend="triton", temperature=0.7)
    want = token_logprobs_reference(h, w, t, temperature=0.7).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("ok", numpy.__version__)
""")


def test_patch_runs_a_kernel(monkeypatch):
    """With the patch in place (as under numpy >= 2.3), interpreted kernels still compute right."""
    if not _triton_compat._interpreter_on():
        pytest.skip("compiled GPU run: the interpreter is not used")
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", interpreter._patch_lang_tensor)
    monkeypatch.setattr("numpy.__version__", "2.5.0")
    assert _triton_compat.apply()
    patched = interpreter._patch_lang_tensor
    assert patched._grpo_kernels_numpy_fix
    assert _triton_compat.apply() and interpreter._patch_lang_tensor is patched  # not wrapped twice
    h, w = torch.randn(5, 17), torch.randn(29, 17)
    t = torch.randint(0, 29, (5,))
    got = grpo_kernels.token_logprobs(h, w, t, backend="triton")
    torch.testing.assert_close(got, token_logprobs_reference(h, w, t).float(), rtol=1e-5, atol=1e-5)


def test_patch_not_applied_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _triton_compat.apply()


def test_interpreter_with_new_numpy():
    new_numpy = os.environ.get("GRPO_KERNELS_NEW_NUMPY")
    if not new_numpy:
        pytest.skip("GRPO_KERNELS_NEW_NUMPY (a directory holding numpy >= 2.3) not set; .ci/run sets it")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([new_numpy, os.getcwd()]))
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok 2.")
