"""What the TRL integration needs from TRL itself: the import, the version check, the logit scale
TRL reads from a model config, and the one-time fallback warning.

The integration replaces internals of one TRL release line (``add_fused_lm_head``,
``ChunkedLogProbFunction``, ``ChunkedDivergenceFunction``, ``GRPOTrainer._compute_loss``), so it
runs only on the TRL it was written and tested against.
"""

from __future__ import annotations

import warnings

try:
    import trl
    from packaging.version import Version
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "grpo_kernels.integrations.trl needs TRL: pip install 'grpo-kernels[trl]' (trl>=1.16,<1.17)"
    ) from exc

SUPPORTED_TRL_VERSIONS = ">=1.16,<1.17"


class TRLFallbackWarning(UserWarning):
    """A call that grpo-kernels does not implement ran on TRL's own code instead (issued once per reason)."""


_WARNED: set[str] = set()


def warn_fallback(reason: str) -> None:
    """Say once per distinct ``reason`` that a call ran on TRL's own implementation."""
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(f"grpo-kernels: {reason}; this call runs TRL's own implementation instead (same result, "
                  "TRL's speed and memory)", TRLFallbackWarning, stacklevel=3)


def check_trl_version() -> None:
    """``ImportError`` unless the installed TRL is of the supported release line."""
    found = Version(trl.__version__)
    if not (Version("1.16") <= found < Version("1.17")):
        raise ImportError(
            f"grpo_kernels.integrations.trl supports trl{SUPPORTED_TRL_VERSIONS} (it replaces TRL internals of "
            f"that release line); found trl {trl.__version__}")


def logit_scale(text_config) -> float:
    """The multiplier TRL applies to a model's logits before the soft-cap and the temperature (1.0
    for most models), read from the config exactly as ``trl.trainer.utils.add_fused_lm_head`` and
    ``DistillationTrainer`` read it. May be 0 or negative (TRL keeps such a value as it is)."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        logits_scaling = text_config.logits_scaling
        scale = logits_scaling if text_config.model_type == "hyperclovax" else 1 / logits_scaling
    return 1.0 if scale is None else float(scale)


def zero3_enabled() -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the parameters: our kernels read the LM-head weight in
    their backward, after ZeRO-3 has partitioned it again, so those calls run TRL's code, which
    gathers it (``maybe_gather_lm_head_ctx``) in both passes."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def folded_scale(temperature: float, scale: float, softcap: float | None) -> tuple[float, float | None]:
    """TRL's ``softcap * tanh(scale * y / softcap) / T`` as our kernels' ``c * tanh(y / c) / T'``:
    ``T' = T / scale``, ``c = softcap / scale`` (``scale > 0``); without a soft-cap ``scale * y / T
    = y / T'``. Returns ``(T', c)``."""
    return temperature / scale, None if softcap is None else softcap / scale
