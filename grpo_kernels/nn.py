"""``torch.nn`` modules: drop-in replacements for Liger-Kernel's GRPO loss module."""

from __future__ import annotations

import inspect
import warnings

import torch

from grpo_kernels.ops.fused_linear_grpo import fused_linear_grpo_loss
from grpo_kernels.ops.grpo_loss import OPTIONS
from grpo_kernels.ops.logprobs import token_logprobs
from grpo_kernels.ops.packing import packed_shape
from grpo_kernels.ops.utils import check_bool
from grpo_kernels.ops.vocab_parallel import check_process_group

_IGNORE_INDEX = -100


class FusedLinearGRPOLoss(torch.nn.Module):
    """Fused LM head + GRPO loss with the interface of Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOLoss``.

    ``from grpo_kernels import FusedLinearGRPOLoss as LigerFusedLinearGRPOLoss`` works: same
    constructor arguments and defaults, same ``forward`` arguments, same return value
    ``(loss, (kl, clip_ratio))`` (``kl`` only when ``beta != 0``; ``clip_ratio`` is the token mean of
    ``clip_ratio/region_mean``). The loss is computed by :func:`grpo_kernels.fused_linear_grpo_loss`
    (TRL 1.16 semantics) without ever storing logits.

    Args:
        beta: weight of the k3 KL penalty. Without a reference (``use_ref_model=False``) the KL is
            taken against the policy itself, i.e. it is 0 and has no gradient, as in Liger.
        compiled: accepted for compatibility, no effect (the kernels are compiled Triton already).
        use_ref_model: take reference log-probs from ``ref_per_token_logps`` or, when absent, compute
            them from ``ref_input``/``ref_weight``/``ref_bias`` under ``no_grad``.
        chunk_size: accepted for compatibility, no effect (memory is O(B*T) at any batch size).
        epsilon_low, epsilon_high: clip range ``[1 - epsilon_low, 1 + epsilon_high]`` (cispo: the cap).
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``, ``luspo`` or ``vespo``.
        max_completion_length: required by ``dr_grpo``.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        sapo_temperature_pos, sapo_temperature_neg: SAPO temperatures (> 0).
        temperature: logits are divided by it before the softmax.
        delta: two-sided clipping bound (> 0), or ``None``.
        use_bias_correction_kl: multiply the KL by the importance ratio.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma-weight shape and
            rate for non-negative / negative advantages (used by ``vespo`` only; ``vllm_is_ratio`` then
            enters the sequence weight instead of multiplying the loss, as in Liger and TRL).
        process_group: (not in Liger) vocabulary-parallel head: ``lin_weight``/``bias`` (and
            ``ref_weight``/``ref_bias``) are this rank's vocabulary shard, hidden states the same on
            every rank; see :func:`grpo_kernels.ops.vocab_parallel.vocab_parallel_logprobs`.
        loss_options: (not in Liger) any other option of :func:`grpo_kernels.grpo_loss`, passed as
            given: the options of the loss types Liger lacks (e.g. ``adv_tau``, ``kl_tau``,
            ``ipo_threshold``), verl's aggregations, rollout correction in bypass mode
            (``rollout_is``, ``rollout_rs``, ... with ``bypass_mode=True``: ``old_per_token_logps``
            are then the rollout's; Liger's forward has no argument for separate sampling log-probs).
            Unknown names raise a ``TypeError`` here; values are checked at the first forward.

    Differences from Liger 0.8.5, all in favour of TRL 1.16's math: ``luspo`` at token level (or with
    a KL term) aggregates ``sum_t m L / B`` as TRL does (Liger sums unmasked tokens), and with
    ``delta < 1 + epsilon_high`` the clip metric uses the delta-clamped ratio as TRL does.
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        *,
        process_group=None,
        loss_options: dict | None = None,
    ):
        super().__init__()
        self.loss_options = dict(loss_options or {})
        unknown = set(self.loss_options) - set(OPTIONS)
        if unknown:
            raise TypeError(f"unknown grpo_loss option(s) in loss_options: {', '.join(sorted(unknown))}")
        own = set(inspect.signature(type(self).__init__).parameters) | {"num_items_in_batch"}
        if own & set(self.loss_options):
            raise TypeError(f"loss_options {', '.join(sorted(own & set(self.loss_options)))}: pass them as the "
                            "constructor's (or forward's) own arguments")
        # flags are bools (Liger would take "no" as True); a group is a ProcessGroup
        for name, value in (("compiled", compiled), ("use_ref_model", use_ref_model),
                            ("use_bias_correction_kl", use_bias_correction_kl)):
            check_bool(name, value)
        if process_group is not None:
            check_process_group(process_group)
        if sapo_temperature_pos <= 0:
            raise ValueError(f"sapo_temperature_pos must be positive, got {sapo_temperature_pos}")
        if sapo_temperature_neg <= 0:
            raise ValueError(f"sapo_temperature_neg must be positive, got {sapo_temperature_neg}")
        if delta is not None and delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
            raise ValueError(
                f"Sequence-level importance sampling is not supported for loss_type='{loss_type}'. "
                "Use importance_sampling_level='token' instead.")
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos = vespo_k_pos
        self.vespo_lambda_pos = vespo_lambda_pos
        self.vespo_k_neg = vespo_k_neg
        self.vespo_lambda_neg = vespo_lambda_neg
        self.process_group = process_group

    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
        *,
        cu_seqlens=None,
    ):
        """Args (Liger's names): ``_input`` ``[B, T, H]`` (or ``[B*T, H]``) hidden states,
        ``lin_weight`` ``[V, H]``, ``selected_token_ids`` / ``attention_mask`` ``[B, T]``,
        ``advantages`` ``[B]``, ``bias`` ``[V]``, ``ref_per_token_logps`` / ``old_per_token_logps``
        ``[B, T]``, ``ref_input`` / ``ref_weight`` / ``ref_bias`` (reference model's hidden states and
        head, used when ``use_ref_model`` and no ``ref_per_token_logps``), ``vllm_is_ratio`` ``[B, T]``,
        ``[B, 1]`` or ``[B]`` (applied as given), ``num_items_in_batch`` (dapo/cispo normalizer).
        ``cu_seqlens`` (not in Liger; keyword only): packed sequences, int32/int64 ``[S + 1]`` (see
        :func:`grpo_kernels.grpo_loss`): ``_input`` / ``ref_input`` ``[N, H]`` or ``[1, N, H]``, the
        token tensors ``[N]`` or ``[1, N]``, ``advantages`` ``[S]``; the padded layout's results.

        Returns ``(loss, metrics)`` with ``metrics = (kl, clip_ratio)`` when ``beta != 0`` else
        ``(clip_ratio,)``.
        """
        if cu_seqlens is not None:  # packed: read as one row of N tokens ([1, N], hidden [1, N, H])
            num_tokens = packed_shape("attention_mask", attention_mask.shape)
            attention_mask = attention_mask.reshape(1, num_tokens)
            if isinstance(selected_token_ids, torch.Tensor) and selected_token_ids.numel() == num_tokens:
                selected_token_ids = selected_token_ids.reshape(1, num_tokens)
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [B, T], got shape {tuple(attention_mask.shape)}")
        batch, seq_len = attention_mask.shape
        hidden = self._as_batch_time(_input, "_input", batch, seq_len)

        ref_logprobs = None
        if self.use_ref_model:
            if ref_per_token_logps is None and ref_input is None:
                raise ValueError("use_ref_model=True needs ref_per_token_logps or ref_input (with ref_weight)")
            if ref_per_token_logps is not None:
                if ref_input is not None:
                    warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.")
                ref_logprobs = ref_per_token_logps
            else:
                if ref_weight is None:
                    raise ValueError("ref_input needs ref_weight (the reference model's LM head)")
                ref_hidden = self._as_batch_time(ref_input, "ref_input", batch, seq_len)
                with torch.no_grad():
                    targets = selected_token_ids.masked_fill(attention_mask == 0, _IGNORE_INDEX)
                    ref_logprobs = token_logprobs(ref_hidden, ref_weight, targets, bias=ref_bias,
                                                  temperature=self.temperature, ignore_index=_IGNORE_INDEX,
                                                  process_group=self.process_group)

        loss, metrics = fused_linear_grpo_loss(
            hidden, lin_weight, selected_token_ids, attention_mask, advantages,
            bias=bias,
            old_logprobs=old_per_token_logps,
            ref_logprobs=ref_logprobs,
            temperature=self.temperature,
            # No reference: Liger takes KL against the policy itself, which is 0 with 0 gradient.
            beta=self.beta if ref_logprobs is not None else 0.0,
            loss_type=self.loss_type,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            num_items_in_batch=num_items_in_batch,
            rollout_is_ratio=vllm_is_ratio,
            use_bias_correction_kl=self.use_bias_correction_kl,
            **{**self._type_specific_options(), **self.loss_options},
            process_group=self.process_group,
            cu_seqlens=cu_seqlens,
        )
        outputs = []
        if self.beta != 0.0:
            outputs.append(metrics["kl"] if ref_logprobs is not None else torch.zeros_like(loss).detach())
        outputs.append(metrics["clip_ratio/region_mean"])
        return loss, tuple(outputs)

    def _type_specific_options(self) -> dict:
        # Liger keeps every loss type's options on the module and ignores those of other types;
        # grpo_loss refuses an option its loss type would ignore, so pass only the ones it reads.
        if self.loss_type == "sapo":
            return dict(sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg)
        if self.loss_type == "vespo":
            return dict(vespo_k_pos=self.vespo_k_pos, vespo_lambda_pos=self.vespo_lambda_pos,
                        vespo_k_neg=self.vespo_k_neg, vespo_lambda_neg=self.vespo_lambda_neg)
        if self.loss_type in ("cispo",):
            return {}
        return dict(delta=self.delta)

    @staticmethod
    def _as_batch_time(hidden, name, batch, seq_len):
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(hidden).__name__}")
        if hidden.dim() == 2 and hidden.shape[0] == batch * seq_len:
            return hidden.reshape(batch, seq_len, hidden.shape[1])
        if hidden.dim() == 3 and tuple(hidden.shape[:2]) == (batch, seq_len):
            return hidden
        raise ValueError(f"{name} must be [B, T, H] or [B*T, H] with [B, T] = [{batch}, {seq_len}] "
                         f"(attention_mask's shape), got {tuple(hidden.shape)}")
