"""Shared helpers for the ops: where a kernel runs, and input checks that raise clear errors.

Every public op validates its inputs with these helpers *before* launching anything, so that a
bad input is a ``ValueError``/``TypeError`` naming the argument, never a wrong number or an
illegal memory access on the GPU.
"""

from __future__ import annotations

import math
import numbers
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
    """``value`` as a float: a real number (``int``, ``float``, a numpy scalar; not a ``bool``, a
    string or a tensor, which are never converted), finite and > 0; else a ``TypeError`` or
    ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
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
    argument. ``grpo_kernels.ops.sm90_check`` compiles each spec for H100 and gates on spills,
    shared memory, wgmma for tensor-core dots, and floating-point atomics: a spec whose PTX holds
    an ``atom``/``red`` on a float type fails unless ``float_atomics=True`` (only the atomic
    backward of the log-prob op is marked so; integer atomics such as locks are always allowed).
    """

    name: str
    kernel: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    float_atomics: bool = False


TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_bool(name: str, value) -> bool:
    """``value`` itself when it is a ``bool`` (or a numpy bool); else a ``TypeError`` naming ``name``.

    Strings, numbers and tensors are never converted: ``bool("no")`` is True, so a flag passed as
    text would silently mean its opposite.
    """
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):  # numpy 2 names it bool
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
