"""The fused LM head: TRL 1.16's ``add_fused_lm_head`` calling convention on grpo-kernels.

``install_fused_lm_head(model, temperature=..., cast_lm_head_to_fp32=..., outputs=...)`` makes
``model(..., labels=labels, fused_lm_head=True)`` return a ``FusedCausalLMOutput`` whose per-token
fields (``log_probs``, ``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``, each ``[B,
T - 1]``, or ``[B, T]`` with pre-shifted ``shift_labels``) come from
:func:`grpo_kernels.token_logprobs` in one pass over the vocabulary, logits never stored. Ignored
labels (``-100``) give 0 / False and cost no work. ``loss`` is TRL's: the negative log-likelihood
summed over the labelled tokens, over their count or ``num_items_in_batch``, plus the MoE
load-balancing loss when router logits are asked for. Without ``fused_lm_head`` the model's
previous forward runs, so generation is unchanged.

With ``grpo_loss=<request>`` (what :class:`~grpo_kernels.integrations.trl.FusedGRPOTrainer` and a
patched ``GRPOTrainer`` pass) the forward returns the GRPO loss itself, from
:func:`grpo_kernels.grpo_loss` chained to the log-prob kernel, computed inside the forward so that
wrappers which manage parameters around ``forward`` (DDP, FSDP) see the LM-head weight used.
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from trl.trainer import utils as _trl_utils
from trl.trainer.utils import FusedCausalLMOutput

from grpo_kernels.integrations.trl._compat import logit_scale as read_logit_scale
from grpo_kernels.integrations.trl._compat import warn_fallback
from grpo_kernels.integrations.trl.functions import (
    OPTIONAL_OUTPUTS,
    TRL_CHUNKED_LOGPROB,
    logprob_fallback_reason,
    token_outputs,
)
from grpo_kernels.ops.utils import check_bool, check_positive_finite

__all__ = ["install_fused_lm_head", "GRPOLossRequest", "FUSED_OUTPUTS"]

FUSED_OUTPUTS = ("log_probs",) + OPTIONAL_OUTPUTS
# TRL's own head installer, captured before patch_trl replaces it.
TRL_ADD_FUSED_LM_HEAD = _trl_utils.add_fused_lm_head
# TRL's vocabulary tile width (used only when a call falls back to TRL's function).
_TRL_CHUNK_SIZE = 32768


@dataclass
class GRPOLossRequest:
    """What the GRPO loss path hands the fused forward (every ``[B, T]`` is the completion)."""

    completion_ids: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B] (or [B, T])
    old_logprobs: torch.Tensor | None  # [B, T]
    ref_logprobs: torch.Tensor | None  # [B, T]
    options: dict  # the scalar options of grpo_kernels.grpo_loss


def install_fallback_reason(temperature, cast_lm_head_to_fp32, outputs) -> str | None:
    """Why ``install_fused_lm_head`` would refuse arguments that TRL's ``add_fused_lm_head``
    accepts (None: it takes them); the patched ``add_fused_lm_head`` then installs TRL's head."""
    for check in (lambda: check_positive_finite("temperature", temperature),
                  lambda: check_bool("cast_lm_head_to_fp32", cast_lm_head_to_fp32), lambda: _check_outputs(outputs)):
        try:
            check()
        except (TypeError, ValueError) as exc:
            return str(exc)
    return None


def _check_outputs(outputs) -> tuple[str, ...]:
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs must be a tuple of names among {FUSED_OUTPUTS}, got {type(outputs).__name__}")
    unknown = [name for name in outputs if name not in FUSED_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs: unknown name(s) {unknown}; expected names among {FUSED_OUTPUTS}")
    return tuple(outputs)


def install_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                          outputs: tuple[str, ...] = ("log_probs",), *, backend: str = "auto") -> None:
    """Give ``model`` (a ``transformers`` causal LM, or a vision-language model) grpo-kernels'
    fused LM head, with the signature and results of ``trl.trainer.utils.add_fused_lm_head``.

    Args:
        model: the model to patch (before wrapping it with PEFT, as for TRL's).
        temperature: the logits are divided by it (after the model's logit scale and soft-cap).
        cast_lm_head_to_fp32: project in float32, outside autocast.
        outputs: per-token fields to compute, among ``"log_probs"``, ``"entropy"``,
            ``"log_sum_sq_probs"``, ``"mean_logits"``, ``"is_top1"`` (the others are None);
            ``log_probs`` (and so ``loss``) always is.
        backend: what :func:`grpo_kernels.token_logprobs` gets (``"auto"``, ``"triton"``,
            ``"torch"``).

    A call our kernels do not implement (a logit scale <= 0, DeepSpeed ZeRO-3) runs TRL's
    ``ChunkedLogProbFunction`` instead, with a one-time ``TRLFallbackWarning``.
    """
    temperature = check_positive_finite("temperature", temperature)
    cast_lm_head_to_fp32 = check_bool("cast_lm_head_to_fp32", cast_lm_head_to_fp32)
    outputs = _check_outputs(outputs)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    scale = read_logit_scale(text_config)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    # Before transformers 5, vision-language models expose their language backbone as `model`.
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"

    def per_token(hidden, weight, bias, labels, names):
        reason = logprob_fallback_reason(hidden, temperature, softcap, scale)
        if reason is None:
            return token_outputs(hidden, weight, bias, labels, temperature, softcap, scale, names, backend=backend)
        warn_fallback(f"the fused LM head with {reason}")
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        # TRL's own function on every position (labels clamped), zeroed where ignored
        mask = labels != -100
        with maybe_gather_lm_head_ctx(weight, bias):
            result = TRL_CHUNKED_LOGPROB.apply(
                hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.clamp(min=0).reshape(-1), temperature,
                _TRL_CHUNK_SIZE, softcap, scale, names)
        return tuple(None if x is None else x.view(mask.shape).masked_fill(~mask, 0) for x in result)

    # Keep the original signature: `generate` validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                       grpo_loss: GRPOLossRequest | None = None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return previous_forward(*args, **kwargs)
        # The backbone and the head are looked up on each call: FSDP and PEFT replace them later.
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = getattr(self, backbone_attr)(*args, **kwargs)
        last_hidden = backbone_outputs.last_hidden_state
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: gather the head once
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        last_hidden = last_hidden.to(weight.device)
        if grpo_loss is not None:
            # Position t - 1 predicts completion token t; tokens outside the loss mask are ignored
            # by the log-prob kernel (no forward or backward work), as in fused_linear_grpo_loss.
            from grpo_kernels.ops.fused_linear_grpo import completion_targets

            num_completion = grpo_loss.completion_ids.shape[1]
            hidden = last_hidden[:, -num_completion - 1:-1]
            labels = completion_targets(grpo_loss.completion_ids, grpo_loss.loss_mask, weight.shape[0])
        elif shift_labels is None:
            hidden, labels = last_hidden[:, :-1], labels[:, 1:]
        else:
            hidden, labels = last_hidden, shift_labels
        labels = labels.to(weight.device)
        mask = labels != -100
        autocast = torch.autocast(hidden.device.type, enabled=False) if cast_lm_head_to_fp32 else nullcontext()
        if cast_lm_head_to_fp32:
            hidden = hidden.float()
        names = ("log_probs", "entropy") if grpo_loss is not None else outputs
        with autocast:
            log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = per_token(hidden, weight, bias, labels, names)

        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _load_balancing_loss(self, text_config, backbone_outputs, kwargs.get("attention_mask"))
        if grpo_loss is not None:
            return _grpo_output(grpo_loss, log_probs, entropy, aux_loss, backend)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if aux_loss is not None:
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=aux_loss)

    _fused_forward.grpo_kernels_head = True  # what the GRPO loss path looks for
    model.forward = types.MethodType(_fused_forward, model)


def has_grpo_kernels_head(model) -> bool:
    """Whether ``model``'s forward (or its PEFT base model's) is the one this module installs."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(getattr(model.forward, "__func__", None), "grpo_kernels_head", False)


def _grpo_output(request: GRPOLossRequest, log_probs, entropy, aux_loss, backend):
    """grpo_kernels.fused_linear_grpo_loss spelled out (token_logprobs chained with grpo_loss; the
    loss's backward feeds the log-prob kernel's backward), so that the per-token log-probs and
    entropies stay available for TRL's metrics."""
    from grpo_kernels.ops.grpo_loss import grpo_loss as grpo_loss_fn

    if request.options["entropy_coef"] == 0:
        entropy = entropy.detach()  # metric and entropy mask only: no entropy backward
    with torch.autocast(log_probs.device.type, enabled=False):
        loss, _ = grpo_loss_fn(
            log_probs, request.loss_mask, request.advantages, old_logprobs=request.old_logprobs,
            ref_logprobs=request.ref_logprobs, entropy=entropy, backend=backend, **request.options)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs.detach(), entropy=entropy.detach(), aux_loss=aux_loss)


def _load_balancing_loss(model, text_config, backbone_outputs, attention_mask):
    # The MoE load-balancing loss, as TRL's fused LM head computes it.
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    if Version(transformers.__version__) < Version("5.0.0") or (
            text_config.model_type == "gpt_oss" and Version(transformers.__version__) < Version("5.6.0")):
        num_experts, num_experts_per_tok = model.num_experts, model.num_experts_per_tok
    else:
        num_experts, num_experts_per_tok = text_config.num_experts, text_config.num_experts_per_tok
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, num_experts_per_tok, attention_mask)
