"""TRL integration: ``GRPOTrainer`` with its policy loss and log-probs computed by grpo-kernels.

``FusedGRPOTrainer`` is TRL's ``GRPOTrainer`` (same constructor, same ``GRPOConfig``) with two
changes:

* The policy loss is grpo-kernels' fused hidden-states-to-loss chain (what
  :func:`grpo_kernels.fused_linear_grpo_loss` computes): the backbone's last hidden states and the
  LM-head weight go into :func:`grpo_kernels.token_logprobs`, its per-token log-probs and
  entropies into :func:`grpo_kernels.grpo_loss`, whose backward feeds the log-prob kernel's
  backward. Out come TRL's loss and TRL's logged metrics (``kl``, ``entropy``, ``clip_ratio/*``,
  ``cispo_clip_ratio``, ``policy_loss``, ``entropy_coef``, ``aux_loss``) under the same names,
  with TRL's normalization for every loss type and gradient accumulation.
* The old-policy and reference log-probs (no-grad forwards) come from
  :func:`grpo_kernels.token_logprobs` instead of TRL's chunked LM head.

Neither path ever materializes ``[B, T, V]`` logits. Options whose math grpo-kernels does not
implement raise a ``ValueError`` when the trainer is built (see :func:`check_grpo_config`), so a
run never silently optimizes something other than what its config says.

Usage (a drop-in for ``trl.GRPOTrainer``)::

    from grpo_kernels.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

Supported TRL versions: ``trl>=1.16,<1.17`` (the trainer overrides TRL's ``_compute_loss`` and
replaces the fused LM head TRL installs, both internals of that release line).
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass

import torch

try:
    import trl
    import transformers
    from packaging.version import Version
    from trl import GRPOTrainer
    from accelerate.utils import is_peft_model
    from trl.trainer.utils import FusedCausalLMOutput, nanmax, nanmin
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "grpo_kernels.integrations.trl needs TRL: pip install 'grpo-kernels[trl]' (trl>=1.16,<1.17)"
    ) from exc

from grpo_kernels.ops.fused_linear_grpo import completion_targets
from grpo_kernels.ops.grpo_loss import grpo_loss as grpo_loss_fn
from grpo_kernels.ops.grpo_loss import validate_loss_options
from grpo_kernels.ops.logprobs import token_logprobs

__all__ = ["FusedGRPOTrainer", "check_grpo_config", "install_fused_lm_head", "SUPPORTED_TRL_VERSIONS"]

SUPPORTED_TRL_VERSIONS = ">=1.16,<1.17"
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# loss types TRL normalizes by num_items_in_batch (per accumulation window)
_GLOBAL_TOKEN_MEAN_TYPES = ("dapo", "cispo", "vespo")
_CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# inputs TRL adds for vision-language models
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_images")


def _check_trl_version() -> None:
    found = Version(trl.__version__)
    if not (Version("1.16") <= found < Version("1.17")):
        raise ImportError(
            f"grpo_kernels.integrations.trl supports trl{SUPPORTED_TRL_VERSIONS} (it overrides TRL "
            f"internals of that release line); found trl {trl.__version__}")


def check_grpo_config(args) -> None:
    """Raise ``ValueError`` for every ``GRPOConfig`` option whose math grpo-kernels does not implement.

    Supported: loss_type grpo/bnpo/dr_grpo/dapo/cispo/sapo/luspo/vespo (with vespo_k_pos,
    vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg); importance_sampling_level token/sequence
    (sequence not with cispo, sapo or vespo); epsilon, epsilon_high, delta; beta with a
    reference model (use_bias_correction_kl on or off); temperature; top_entropy_quantile;
    entropy_coef and adaptive entropy control; off_policy_mask_threshold; the vLLM
    importance-sampling correction (all four modes); num_iterations, steps_per_generation and
    gradient accumulation (TRL's normalizers, including ``num_items_in_batch`` for dapo/cispo);
    sapo temperatures; cast_lm_head_to_fp32; PEFT; tool/environment masks (they only mask tokens).
    Not supported: sequence-level ratios with cispo/sapo/vespo (TRL accepts vespo with a warning
    and ignores the level for its weight), and entropy masking (``top_entropy_quantile < 1``) on
    several processes.
    """
    problems = []
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        problems.append(
            f"loss_type={args.loss_type!r} is not implemented by grpo-kernels (supported: "
            f"{', '.join(SUPPORTED_LOSS_TYPES)})")
    if args.importance_sampling_level not in ("token", "sequence"):
        problems.append(f"importance_sampling_level={args.importance_sampling_level!r} is unknown")
    elif args.importance_sampling_level == "sequence" and args.loss_type in ("cispo", "sapo", "vespo"):
        problems.append(
            f"importance_sampling_level='sequence' with loss_type={args.loss_type!r} is not supported "
            "(grpo-kernels defines sequence-level ratios for the clipped losses only)")
    if args.top_entropy_quantile < 1.0 and args.world_size > 1:
        problems.append(
            "top_entropy_quantile < 1 on several processes is not supported: TRL takes the entropy "
            "quantile over all ranks, grpo-kernels over the local micro-batch")
    if not problems:
        try:  # the loss options themselves (ranges, combinations), without any tensor
            validate_loss_options(**_static_loss_options(args))
        except (TypeError, ValueError) as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("FusedGRPOTrainer cannot run this GRPOConfig:\n- " + "\n- ".join(problems))


def _static_loss_options(args) -> dict:
    """The grpo_loss options a GRPOConfig determines (those known before any batch)."""
    options = dict(
        beta=args.beta, loss_type=args.loss_type, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        importance_sampling_level=args.importance_sampling_level,
        max_completion_length=args.max_completion_length, use_bias_correction_kl=args.use_bias_correction_kl,
        top_entropy_quantile=args.top_entropy_quantile, off_policy_mask_threshold=args.off_policy_mask_threshold)
    options.update(_type_specific_options(args))
    return options


def _type_specific_options(args) -> dict:
    """The options only one loss type reads (TRL keeps them all on the config and ignores the others)."""
    if args.loss_type in _CLIP_LOSS_TYPES:
        return dict(delta=args.delta)
    if args.loss_type == "sapo":
        return dict(sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg)
    if args.loss_type == "vespo":
        return dict(vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
                    vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg)
    return {}


def _check_model(trainer) -> None:
    problems = []
    if trainer._is_vlm:
        problems.append("multimodal (vision-language) models and processors are not supported")
    text_config = trainer.model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        problems.append(
            f"{type(text_config).__name__}.final_logit_softcapping is set: logit soft-capping is not "
            "supported by the grpo-kernels log-prob kernel")
    if _logit_scale(text_config) <= 0:
        problems.append(f"a non-positive logit scale ({_logit_scale(text_config)}) is not supported")
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        problems.append(
            "DeepSpeed ZeRO-3 is not supported: the kernel's backward reads the LM-head weight after "
            "ZeRO-3 has partitioned it again")
    if problems:
        raise ValueError("FusedGRPOTrainer cannot train this model:\n- " + "\n- ".join(problems))


def _logit_scale(text_config) -> float:
    # The multiplier TRL's fused LM head applies to the logits before the temperature (1.0 for
    # most models), read from the config exactly as trl.trainer.utils.add_fused_lm_head does.
    logit_scale = getattr(text_config, "logit_scale", None)
    if logit_scale is None:
        logit_scale = getattr(text_config, "output_multiplier", None)
    if logit_scale is None:
        logit_scale = getattr(text_config, "lm_head_multiplier", None)
    if logit_scale is None and getattr(text_config, "logits_scaling", None) is not None:
        logits_scaling = text_config.logits_scaling
        logit_scale = logits_scaling if text_config.model_type == "hyperclovax" else 1 / logits_scaling
    return 1.0 if logit_scale is None else float(logit_scale)


@dataclass
class _GRPOLossRequest:
    """What ``FusedGRPOTrainer._compute_loss`` hands the patched forward (all ``[B, T]`` are the completion)."""

    completion_ids: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B] (or [B, T])
    old_logprobs: torch.Tensor | None  # [B, T]
    ref_logprobs: torch.Tensor | None  # [B, T]
    options: dict  # the scalar options of grpo_kernels.grpo_loss


def install_fused_lm_head(model, *, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                          backend: str = "auto") -> None:
    """Make ``model(..., labels=labels, fused_lm_head=True)`` run on grpo-kernels.

    The calling convention of TRL's ``add_fused_lm_head`` (which ``GRPOTrainer`` installs and this
    replaces): per-token log-probs and entropies of the next-token labels (``-100`` = ignored, 0
    there) in a ``FusedCausalLMOutput``, from :func:`grpo_kernels.token_logprobs`. With
    ``grpo_loss=<request>`` the forward returns the GRPO loss of the completion tokens instead
    (``loss``, plus the detached per-token ``log_probs`` and ``entropy`` for the metrics),
    computed inside the forward so that wrappers which manage parameters around ``forward`` (DDP,
    FSDP) see the LM-head weight used. Without ``fused_lm_head`` the previous forward runs
    (generation is unchanged).
    """
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        raise ValueError("logit soft-capping (final_logit_softcapping) is not supported by grpo-kernels")
    logit_scale = _logit_scale(text_config)
    if logit_scale <= 0:
        raise ValueError(f"a non-positive logit scale ({logit_scale}) is not supported")
    # logit_scale * (h W^T + b) / T is the distribution of (h W^T + b) / (T / logit_scale)
    kernel_temperature = float(temperature) / logit_scale
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"

    # Keep the original signature: `generate` validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                       grpo_loss: _GRPOLossRequest | None = None, **kwargs):
        if not fused_lm_head:
            return previous_forward(*args, labels=labels, shift_labels=shift_labels,
                                    num_items_in_batch=num_items_in_batch, **kwargs)
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
            num_completion = grpo_loss.completion_ids.shape[1]
            hidden = last_hidden[:, -num_completion - 1:-1]
            targets = completion_targets(grpo_loss.completion_ids, grpo_loss.loss_mask, weight.shape[0])
        elif shift_labels is not None:
            hidden, targets = last_hidden, shift_labels
        else:
            hidden, targets = last_hidden[:, :-1], labels[:, 1:]
        targets = targets.to(weight.device)
        hidden, weight, bias = _compute_dtype_operands(hidden, weight, bias, cast_lm_head_to_fp32)

        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _load_balancing_loss(self, text_config, backbone_outputs, kwargs.get("attention_mask"))
        with torch.autocast(hidden.device.type, enabled=False):
            log_probs, entropy = token_logprobs(
                hidden, weight, targets, bias=bias, temperature=kernel_temperature, return_entropy=True,
                backend=backend)
            if grpo_loss is not None:
                # grpo_kernels.fused_linear_grpo_loss spelled out (token_logprobs chained with
                # grpo_loss; the loss's backward feeds the log-prob kernel's backward), so that the
                # per-token log-probs and entropies stay available for TRL's metrics.
                if grpo_loss.options["entropy_coef"] == 0:
                    entropy = entropy.detach()  # metric and entropy mask only: no entropy backward
                loss, _ = grpo_loss_fn(
                    log_probs, grpo_loss.loss_mask, grpo_loss.advantages, old_logprobs=grpo_loss.old_logprobs,
                    ref_logprobs=grpo_loss.ref_logprobs, entropy=entropy, backend=backend, **grpo_loss.options)
                return FusedCausalLMOutput(loss=loss, log_probs=log_probs.detach(), entropy=entropy.detach(),
                                           aux_loss=aux_loss)
        label_mask = targets != -100
        loss = -log_probs.sum() / (label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if aux_loss is not None:
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=label_mask,
                                   aux_loss=aux_loss)

    model.forward = types.MethodType(_fused_forward, model)


def _compute_dtype_operands(hidden, weight, bias, cast_lm_head_to_fp32):
    # Mirror TRL's LM head: fp32 when cast_lm_head_to_fp32, the autocast dtype under autocast,
    # else the hidden states' dtype. The casts are differentiable, so gradients reach the
    # parameters in their own dtype.
    device_type = hidden.device.type
    if cast_lm_head_to_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = hidden.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _load_balancing_loss(model, text_config, backbone_outputs, attention_mask):
    # The MoE load-balancing loss, as TRL's fused LM head computes it.
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    if Version(transformers.__version__) < Version("5.0.0") or (
            text_config.model_type == "gpt_oss" and Version(transformers.__version__) < Version("5.6.0")):
        num_experts, num_experts_per_tok = model.num_experts, model.num_experts_per_tok
    else:
        num_experts, num_experts_per_tok = text_config.num_experts, text_config.num_experts_per_tok
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, num_experts_per_tok, attention_mask)


_GRPO_TRAINER_SIGNATURE = inspect.signature(GRPOTrainer.__init__)


class FusedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose policy loss and log-probs run on grpo-kernels.

    Same arguments as ``GRPOTrainer``, plus ``kernel_backend`` (``"auto"``, ``"triton"`` or
    ``"torch"``, see :func:`grpo_kernels.token_logprobs`). Raises ``ValueError`` at construction
    for options grpo-kernels does not implement (:func:`check_grpo_config`), multimodal models,
    logit soft-capping and DeepSpeed ZeRO-3; ``ImportError`` for an unsupported TRL version.
    """

    def __init__(self, *args, kernel_backend: str = "auto", **kwargs):
        _check_trl_version()
        bound = _GRPO_TRAINER_SIGNATURE.bind(self, *args, **kwargs)
        config = bound.arguments.get("args")
        if config is not None:
            check_grpo_config(config)  # before TRL loads models
        if kernel_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"kernel_backend must be 'auto', 'triton' or 'torch', got {kernel_backend!r}")
        self.kernel_backend = kernel_backend
        super().__init__(*args, **kwargs)
        check_grpo_config(self.args)
        _check_model(self)
        # Replace the fused LM head GRPOTrainer installed (policy and reference model).
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        install_fused_lm_head(policy, temperature=self.temperature,
                              cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32, backend=kernel_backend)
        if self.ref_model is not None:
            install_fused_lm_head(self.accelerator.unwrap_model(self.ref_model), temperature=self.temperature,
                                  cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32, backend=kernel_backend)

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        for key in _MULTIMODAL_KEYS:
            if inputs.get(key) is not None:
                raise ValueError(f"FusedGRPOTrainer does not support multimodal inputs ({key!r})")
        advantages = inputs["advantages"]
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0

        old_logprobs = inputs.get("old_per_token_logps")
        ref_logprobs = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        use_is_ratio = self.use_vllm and self.vllm_importance_sampling_correction
        num_items = None
        if self.loss_type in _GLOBAL_TOKEN_MEAN_TYPES:
            # TRL divides by num_items_in_batch / num_processes * accumulation / steps_per_generation
            # (num_items_in_batch spans the generation batch on all ranks); grpo_loss divides the
            # count it gets by the world size itself.
            num_items = inputs["num_items_in_batch"].clamp(min=1.0)
            if mode == "train":
                num_items = num_items * accumulation / self.args.steps_per_generation

        entropy_coef = 0.0
        if self._entropy_bonus_enabled:
            # coefficient and gating from the end of the previous optimizer step, as TRL does
            if self.use_adaptive_entropy:
                entropy_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
            else:
                entropy_coef = self.entropy_coef
        # TRL divides the entropy bonus by the accumulation steps for every loss type, the policy
        # term only for the loss types that do not normalize by num_items_in_batch.
        per_window = self.loss_type in _GLOBAL_TOKEN_MEAN_TYPES
        kernel_entropy_coef = entropy_coef / accumulation if per_window else entropy_coef

        options = dict(
            beta=self.beta,
            loss_type=self.loss_type,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            num_items_in_batch=num_items,
            # TRL has already truncated or masked the ratio ("none" mode: used as given); vespo
            # folds it into its sequence weight
            rollout_is_ratio=inputs["importance_sampling_ratio"] if use_is_ratio else None,
            use_bias_correction_kl=self.args.use_bias_correction_kl,
            entropy_coef=kernel_entropy_coef,
            top_entropy_quantile=self.top_entropy_quantile,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            sampling_logprobs=(inputs.get("sampling_per_token_logps")
                               if self.off_policy_mask_threshold is not None else None),
            **_type_specific_options(self.args),
        )
        request = _GRPOLossRequest(completion_ids=completion_ids, loss_mask=mask, advantages=advantages,
                                   old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, options=options)
        model_kwargs = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self.accelerator.autocast():
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=True,
                            grpo_loss=request, **model_kwargs)
        loss = outputs.loss
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            # TRL's own mask, for the metrics; the kernel applied the same quantile to the loss
            entropy_mask = self.get_high_entropy_mask(outputs.entropy, mask, 1 - self.top_entropy_quantile)

        # TRL logs the policy term alone, before the accumulation scaling; the kernel's loss holds
        # -coef * (mean entropy over the tokens the policy term acts on): add it back.
        policy_loss = loss.detach()
        if kernel_entropy_coef != 0.0:
            effective_mask = mask if entropy_mask is None else mask * entropy_mask
            mean_entropy = (outputs.entropy * effective_mask).sum() / effective_mask.sum().clamp(min=1.0)
            policy_loss = policy_loss + kernel_entropy_coef * mean_entropy
        if not per_window:
            loss = loss / accumulation

        if self._entropy_bonus_enabled:
            self._update_entropy_control(mode, policy_loss, outputs.entropy, mask, entropy_mask)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item())
        self._log_policy_metrics(mode, mask, advantages, outputs.log_probs, outputs.entropy, old_logprobs,
                                 ref_logprobs, inputs.get("importance_sampling_ratio") if use_is_ratio else None)
        return loss

    def _update_entropy_control(self, mode, policy_loss, entropies, mask, entropy_mask):
        """TRL's entropy-bonus bookkeeping: policy_loss metric, adaptive coefficient, entropy_coef metric."""
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            effective_mask = mask if entropy_mask is None else mask * entropy_mask
            stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
            self._entropy_window_stats = stats if self._entropy_window_stats is None else (
                self._entropy_window_stats + stats)
            if self.accelerator.sync_gradients:
                window_stats = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window_stats[0] / window_stats[1].clamp(min=1.0)).item()
                if world_entropy <= self.args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta,
                                            self.args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta,
                                            self.args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _log_policy_metrics(self, mode, mask, advantages, per_token_logps, entropies, old_logprobs, ref_logprobs,
                            is_ratio=None):
        """TRL's ``kl``, ``entropy`` and clip-ratio metrics, same names and reductions.

        From the detached per-token log-probs and entropies of the loss's own forward: no extra
        pass over the vocabulary.
        """
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old = per_token_logps if old_logprobs is None else old_logprobs
        log_ratio = per_token_logps - old
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_ratio)

        def masked_seq_mean(x):
            if x.shape[1] == 1:  # sequence level: already one value per sequence
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * mask).sum(), mask.sum().float()
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.beta != 0.0:
            per_token_kl = torch.exp(ref_logprobs - per_token_logps) - (ref_logprobs - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * coef_1
            self._metrics[mode]["kl"].append(global_masked_mean(per_token_kl))
        self._metrics[mode]["entropy"].append(global_masked_mean(entropies))

        if self.loss_type in _CLIP_LOSS_TYPES:
            if self.args.delta is not None:
                coef_1 = torch.clamp(coef_1, max=self.args.delta)
            is_low_clipped = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)
            is_high_clipped = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)
            is_region_clipped = is_low_clipped | is_high_clipped
            self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(is_low_clipped.float()))
            self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(is_high_clipped.float()))
            self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(is_region_clipped.float()))
            gathered_low_clip = self.accelerator.gather(masked_seq_mean(is_low_clipped.float()))
            self._metrics[mode]["clip_ratio/low_min"].append(nanmin(gathered_low_clip).item())
            gathered_high_clip = self.accelerator.gather(masked_seq_mean(is_high_clipped.float()))
            self._metrics[mode]["clip_ratio/high_max"].append(nanmax(gathered_high_clip).item())
        elif self.loss_type == "cispo":
            is_cispo_clipped = (coef_1 > self.epsilon_high) & (advantages > 0)
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(is_cispo_clipped.float()))
        elif self.loss_type == "vespo":
            # TRL's own weight function on the detached log-probs of the loss's forward
            phi_seq = self.get_gamma_weights(
                advantages=advantages, log_ratio_per_token=per_token_logps - old, mask=mask,
                importance_sampling_ratio=is_ratio, k_pos=self.args.vespo_k_pos,
                lambda_pos=self.args.vespo_lambda_pos, k_neg=self.args.vespo_k_neg,
                lambda_neg=self.args.vespo_lambda_neg)
            self._metrics[mode]["vespo/phi_seq_mean"].append(global_masked_mean(phi_seq))
