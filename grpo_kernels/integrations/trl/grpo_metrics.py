"""TRL's GRPO metrics, logged by the fused loss path exactly as ``GRPOTrainer._compute_loss`` logs
them (same names, reductions and cross-process gathers), from the detached per-token log-probs and
entropies of the loss's own forward: no extra pass over the vocabulary.

Functions of the trainer (``self``): the fused path runs on ``FusedGRPOTrainer`` and on a patched
``trl.GRPOTrainer`` alike.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import nanmax, nanmin

# loss types whose metrics are TRL's clip ratios
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def update_entropy_control(self, mode, policy_loss, entropies, mask, entropy_mask):
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


def log_policy_metrics(self, mode, mask, advantages, per_token_logps, entropies, old_logprobs, ref_logprobs,
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

    if self.loss_type in CLIP_LOSS_TYPES:
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
