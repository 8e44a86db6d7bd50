"""TRL's ``GRPOTrainer`` with its policy loss and log-probs computed by grpo-kernels.

``FusedGRPOTrainer`` is TRL's ``GRPOTrainer`` (same constructor, same ``GRPOConfig``) with two
changes, which :func:`~grpo_kernels.integrations.trl.patch_trl` also makes to ``GRPOTrainer``
itself:

* The LM head (every forward with ``fused_lm_head=True``: the loss's, the old-policy and the
  reference log-probs) is :func:`~grpo_kernels.integrations.trl.install_fused_lm_head`'s.
* The policy loss is grpo-kernels' fused hidden-states-to-loss chain (what
  :func:`grpo_kernels.fused_linear_grpo_loss` computes): the log-prob kernel's per-token log-probs
  and entropies go into :func:`grpo_kernels.grpo_loss`, whose backward feeds the log-prob
  kernel's backward. Out come TRL's loss and TRL's logged metrics (``kl``, ``entropy``,
  ``clip_ratio/*``, ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, ``policy_loss``,
  ``entropy_coef``, ``aux_loss``) under the same names, with TRL's normalization for every loss
  type and gradient accumulation. TRL builds the model inputs (vision-language ones included).

Nothing a ``GRPOConfig`` allows is refused. Where the fused loss does not implement an option,
that call computes TRL's own loss on grpo-kernels' LM head (the memory-heavy part), with a
one-time :class:`~grpo_kernels.integrations.trl.TRLFallbackWarning` naming the reason
(:func:`fused_loss_fallback_reason`): sequence-level ratios with cispo, sapo or vespo, entropy
masking (``top_entropy_quantile < 1``) on several processes (TRL's quantile over all ranks),
loss types the kernel does not have (``GRPOTrainer`` subclasses with their own loss, such as
TRL's experimental ``GMPOTrainer``, keep their ``_compute_loss`` and run it on our head), loss
options out of the kernel's ranges, and DeepSpeed ZeRO-3.

Usage (a drop-in for ``trl.GRPOTrainer``)::

    from grpo_kernels.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

Supported TRL versions: ``trl>=1.16,<1.17``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer

from grpo_kernels.integrations.trl._compat import check_trl_version, warn_fallback, zero3_enabled
from grpo_kernels.integrations.trl.grpo_metrics import CLIP_LOSS_TYPES, log_policy_metrics, update_entropy_control
from grpo_kernels.integrations.trl.head import GRPOLossRequest, has_grpo_kernels_head, install_fused_lm_head

__all__ = ["FusedGRPOTrainer", "fused_loss_fallback_reason", "grpo_compute_loss", "FUSED_LOSS_TYPES"]

# TRL's own loss, captured before patch_trl replaces it.
TRL_GRPO_COMPUTE_LOSS = GRPOTrainer._compute_loss
FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# loss types TRL normalizes by num_items_in_batch (per accumulation window)
_GLOBAL_TOKEN_MEAN_TYPES = ("dapo", "cispo", "vespo")


def fused_loss_fallback_reason(args, num_processes: int = 1) -> str | None:
    """Why the fused loss cannot compute this ``GRPOConfig``'s loss (None: it can).

    ``num_processes``: the processes training together (the entropy quantile spans them all).
    """
    if args.loss_type not in FUSED_LOSS_TYPES:
        return f"loss_type={args.loss_type!r} (the fused loss has {', '.join(FUSED_LOSS_TYPES)})"
    if args.importance_sampling_level == "sequence" and args.loss_type in ("cispo", "sapo", "vespo"):
        return (f"importance_sampling_level='sequence' with loss_type={args.loss_type!r} (the fused loss defines "
                "sequence-level ratios for the clipped losses only)")
    if args.top_entropy_quantile < 1.0 and num_processes > 1:
        return ("top_entropy_quantile < 1 on several processes (TRL takes the entropy quantile over all ranks, the "
                "fused loss over its micro-batch)")
    if zero3_enabled():
        return "DeepSpeed ZeRO-3 (the fused loss reads the LM-head weight in its backward)"
    from grpo_kernels.ops.grpo_loss import validate_loss_options

    try:  # the loss options themselves (ranges, combinations), without any tensor
        validate_loss_options(**_static_loss_options(args))
    except (TypeError, ValueError) as exc:
        return f"an option outside the fused loss's ranges ({exc})"
    return None


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
    if args.loss_type in CLIP_LOSS_TYPES:
        return dict(delta=args.delta)
    if args.loss_type == "sapo":
        return dict(sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg)
    if args.loss_type == "vespo":
        return dict(vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
                    vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg)
    return {}


# GRPOTrainer attributes that TRL's loss reads instead of the config field of the same meaning.
_TRAINER_FIELDS = {"loss_type": "loss_type", "importance_sampling_level": "importance_sampling_level",
                   "top_entropy_quantile": "top_entropy_quantile", "beta": "beta", "epsilon": "epsilon_low",
                   "epsilon_high": "epsilon_high", "off_policy_mask_threshold": "off_policy_mask_threshold",
                   "max_completion_length": "max_completion_length"}


def effective_config(trainer) -> SimpleNamespace:
    """The trainer's ``args``, with the fields TRL's loss reads from trainer attributes taken from
    those (a subclass or a caller may set them after construction)."""
    config = SimpleNamespace(**vars(trainer.args))
    for field, attribute in _TRAINER_FIELDS.items():
        if hasattr(trainer, attribute):
            setattr(config, field, getattr(trainer, attribute))
    return config


def grpo_compute_loss(trainer, model, inputs, trl_compute_loss=TRL_GRPO_COMPUTE_LOSS):
    """``GRPOTrainer._compute_loss`` on grpo-kernels: the fused loss where it implements the
    trainer's options and the policy has our head, else ``trl_compute_loss`` (TRL's own)."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if not has_grpo_kernels_head(policy):
        return trl_compute_loss(trainer, model, inputs)  # unpatched TRL head: TRL's loss, silently
    reason = fused_loss_fallback_reason(effective_config(trainer), trainer.accelerator.num_processes)
    if reason is not None:
        warn_fallback(f"the GRPO loss with {reason}: TRL's loss on grpo-kernels' LM head")
        return trl_compute_loss(trainer, model, inputs)
    return _fused_compute_loss(trainer, model, inputs)


def _fused_compute_loss(self, model, inputs):
    mode = "train" if self.model.training else "eval"
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
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
        **_type_specific_options(effective_config(self)),
    )
    request = GRPOLossRequest(completion_ids=completion_ids, loss_mask=mask, advantages=advantages,
                              old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, options=options)
    captured = {}

    def fused_model(*, labels=None, fused_lm_head=True, **model_inputs):
        # TRL's own input building (vision-language fields included) calls this in place of the
        # model: the same inputs, with the loss request instead of labels.
        captured["outputs"] = model(**model_inputs, fused_lm_head=True, grpo_loss=request)
        return captured["outputs"]

    self._get_per_token_logps_and_entropies(
        fused_model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
        compute_aux_loss=self.aux_loss_enabled, pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"), num_images=inputs.get("num_images"),
        pixel_attention_mask=inputs.get("pixel_attention_mask"), spatial_shapes=inputs.get("spatial_shapes"),
        num_tiles=inputs.get("num_tiles"), image_sizes=inputs.get("image_sizes"),
        token_type_ids=inputs.get("token_type_ids"), mm_token_type_ids=inputs.get("mm_token_type_ids"),
        image_position_ids=inputs.get("image_position_ids"))
    outputs = captured["outputs"]
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
        update_entropy_control(self, mode, policy_loss, outputs.entropy, mask, entropy_mask)
    if self.aux_loss_enabled:
        loss = loss + self.router_aux_loss_coef * outputs.aux_loss / accumulation
        self._metrics[mode]["aux_loss"].append(
            self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item())
    log_policy_metrics(self, mode, mask, advantages, outputs.log_probs, outputs.entropy, old_logprobs, ref_logprobs,
                       inputs.get("importance_sampling_ratio") if use_is_ratio else None)
    return loss


class FusedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose policy loss and log-probs run on grpo-kernels.

    Same arguments as ``GRPOTrainer``, plus ``kernel_backend`` (``"auto"``, ``"triton"`` or
    ``"torch"``, see :func:`grpo_kernels.token_logprobs`). ``ImportError`` for an unsupported TRL
    version; every ``GRPOConfig`` runs (see the module docstring for what falls back to TRL's loss).
    """

    def __init__(self, *args, kernel_backend: str = "auto", **kwargs):
        check_trl_version()
        if kernel_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"kernel_backend must be 'auto', 'triton' or 'torch', got {kernel_backend!r}")
        self.kernel_backend = kernel_backend
        super().__init__(*args, **kwargs)
        # Replace the fused LM head GRPOTrainer installed (policy and reference model).
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        install_fused_lm_head(policy, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
                              outputs=("log_probs", "entropy"), backend=kernel_backend)
        if self.ref_model is not None:
            install_fused_lm_head(self.accelerator.unwrap_model(self.ref_model), temperature=self.temperature,
                                  cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32, backend=kernel_backend)

    def _compute_loss(self, model, inputs):
        return grpo_compute_loss(self, model, inputs)
