"""Shared helpers for the ops: where a kernel runs, and input checks that raise clear errors.

Every public op validates its inputs with these helpers *before* launching anything, so that a
bad input is a ``ValueError``/``TypeError`` naming the argument, never a wrong number or an
illegal memory access on the GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    """Pick ``"triton"`` or ``"torch"`` for tensors on ``device``.

    ``auto``: Triton on CUDA tensors, and on CPU tensors when the Triton interpreter is on;
    otherwise the chunked PyTorch path (also bounded in memory).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" or triton_interpreter_enabled() else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return backend


def check_tensor(name: str, tensor, *, dtypes=None, ndim=None, min_ndim=None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(tensor.dtype).replace('torch.', '')}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if min_ndim is not None and tensor.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(tensor.shape)}")


def check_same_device(**tensors) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, tensor in named[1:]:
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}")


def check_positive_finite(name: str, value) -> float:
    if isinstance(value, (bool, str, bytes)):  # bools are not numbers; strings are never parsed
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_index_range(name: str, index: torch.Tensor, size: int, ignore_index: int | None = None) -> None:
    """Every entry of ``index`` is in ``[0, size)`` (or equals ``ignore_index``).

    One reduction and one host sync: cheap next to the op it guards, and it turns an
    out-of-range gather (an illegal memory access on the GPU) into a Python error.
    """
    if index.numel() == 0:
        return
    bad = (index < 0) | (index >= size)
    if ignore_index is not None:
        bad &= index != ignore_index
    if bool(bad.any()):
        first = index[bad].flatten()[0].item()
        allowed = f"[0, {size})" + (f" or ignore_index={ignore_index}" if ignore_index is not None else "")
        raise ValueError(f"{name} holds {int(bad.sum())} out-of-range id(s), e.g. {first}; allowed: {allowed}")


@dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration that the library can launch on a GPU, for the sm_90 compile check.

    ``signature`` maps every kernel argument to its Triton type (``"*bf16"``, ``"*fp32"``,
    ``"i32"``, ``"fp32"``, or ``"constexpr"``); ``constexprs`` gives the value of each constexpr
    argument. ``tests/test_compile_sm90.py`` compiles each spec for H100 and checks spills and
    shared memory, and that the PTX holds no atomic instruction (``atom.*``/``red.*``) unless
    ``float_atomics`` marks a kernel that adds floats with atomics (the atomic backward only).
    """

    name: str
    kernel: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    float_atomics: bool = False


TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
