"""The temperature of the log-prob op: one number, or one per row (per token).

``z = y / T`` with ``y`` the (soft-capped) logits; ``T`` is a positive float, or a float tensor of
hidden's leading shape (or any shape that broadcasts to it, e.g. ``[B, 1]``: one per sequence;
prime-rl samples each sequence at its own temperature). The kernels multiply by ``1 / T``, one
float32 per row, so that a per-row tensor and the same float broadcast give bitwise-equal
results.

Range: ``TEMPERATURE_RANGE = [2**-64, 2**64]``. The logits ``z = y / T`` are float32 on every path:
below ``2**-126`` the reciprocal ``1 / T`` is not a float32 at all (``T = 1e-40`` gave NaN
log-probs), and far below 1 any logit ``|y|`` of ordinary size overflows ``z`` (float32 max
``3.4e38``) where the mathematical log-probs are finite. ``2**-64`` (5.4e-20) keeps ``z`` finite for
``|y| < 1.8e19``: every logit a model produces. ``2**64`` keeps ``1 / T`` a normal float32 (no flush
to zero on the GPU), for a softmax that is uniform to float32 precision anyway. Values outside the
range (and zeros, negatives, NaN, inf) are refused with a ``ValueError`` naming ``temperature``.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

TEMPERATURE_RANGE = (2.0**-64, 2.0**64)
_RANGE_TEXT = (f"[2**-64, 2**64] = [{TEMPERATURE_RANGE[0]:.3g}, {TEMPERATURE_RANGE[1]:.3g}] (z = y / temperature is "
               f"float32: outside this range it overflows or 1 / temperature is not a float32)")


def _in_range(value: float) -> bool:
    return TEMPERATURE_RANGE[0] <= value <= TEMPERATURE_RANGE[1]


def check_temperature(temperature, lead_shape, device) -> float | torch.Tensor:
    """Checks the ``temperature`` argument without reading tensor values (those are checked inside
    the op, :func:`check_temperature_values`); raises TypeError/ValueError naming it.

    Returns the float, or the tensor broadcast to ``lead_shape`` (a view: no copy).
    """
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a float or a floating-point tensor, got a {temperature.dtype} tensor")
        if temperature.device != device:
            raise ValueError(f"temperature is on {temperature.device} but hidden is on {device}")
        try:
            return temperature.expand(tuple(lead_shape))
        except RuntimeError:
            raise ValueError(f"temperature tensor of shape {tuple(temperature.shape)} must be hidden's leading shape "
                             f"{tuple(lead_shape)} (one temperature per row) or broadcast to it") from None
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number or a float tensor, got {type(temperature).__name__}")
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be finite and > 0, got {value}")
    if not _in_range(value):
        raise ValueError(f"temperature must be in {_RANGE_TEXT}, got {value:.3g}")
    return value


def check_temperature_values(temperatures: torch.Tensor) -> None:
    """Every per-row temperature is finite and in ``TEMPERATURE_RANGE`` (one reduction, one host
    sync; called inside the op, where torch.compile does not trace)."""
    if temperatures.numel() == 0:
        return
    values = temperatures.double()
    bad = ~((values >= TEMPERATURE_RANGE[0]) & (values <= TEMPERATURE_RANGE[1]))  # NaN is bad too
    if bool(bad.any()):
        first = values[bad].flatten()[0].item()
        raise ValueError(f"temperature holds {int(bad.sum())} value(s) outside {_RANGE_TEXT}, e.g. {first:.3g}")


class KernelTemperature(NamedTuple):
    """1 / T as the Triton kernels take it: ``rows`` the ``[N]`` float32 per-row column (then
    ``scalar`` is 1.0 and unread), or None with ``scalar`` the one 1 / T, rounded to float32 as
    :func:`inverse_temperature` rounds it (the kernels' ``ROW_TEMP`` switch is ``rows is not None``)."""

    rows: Optional[torch.Tensor]
    scalar: float


def kernel_temperature(temperature: float | torch.Tensor, num_rows: int, device) -> KernelTemperature:
    if isinstance(temperature, torch.Tensor):
        return KernelTemperature(inverse_temperature(temperature, num_rows, device), 1.0)
    return KernelTemperature(None, float(torch.tensor(1.0 / temperature, dtype=torch.float32)))


def inverse_temperature(temperature: float | torch.Tensor, num_rows: int, device) -> torch.Tensor:
    """``[N]`` float32 ``1 / T`` per row, as the kernels read it. The reciprocal is taken in float64
    and rounded once, so a float and a tensor holding the same (float32-exact) value give the same
    bits."""
    if isinstance(temperature, torch.Tensor):
        return (1.0 / temperature.reshape(num_rows).double()).float()
    return torch.full((num_rows,), 1.0 / temperature, device=device, dtype=torch.float32)
