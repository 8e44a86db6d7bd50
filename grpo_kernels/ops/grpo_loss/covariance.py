"""KL-Cov / Clip-Cov's covariance selection (verl 0.9.1): which tokens of the micro-batch get the
|log-ratio| penalty or a zeroed gradient. A batch-wide selection (a top-k, a random draw), so it is
computed in torch before the row pass and handed to the policy term as a per-token input.
"""

from __future__ import annotations

import torch

from grpo_kernels.ops.grpo_loss.rows_torch import Rows


def covariance_selection(cfg, logp, t, draw_seed=None) -> torch.Tensor:
    """KL-Cov / Clip-Cov's tokens float32 (1 = selected) in the token layout (``[B, T]``, or packed
    ``[N]``), over the micro-batch's masked tokens, taken in row-major order (packed: token order,
    the same order: a packed batch selects what its padded layout selects).

    cov_t = (A_t - mean A) (logp_t - mean logp) over the masked tokens (Clip-Cov: verl's masked_mean,
    sum / (n + 1e-8)). KL-Cov: the top max(1, floor(kl_cov_ratio * n)) by cov. Clip-Cov: of the masked
    tokens the clip does not already clip, with clip_cov_lb < cov < clip_cov_ub, max(1, floor(clip_cov_ratio
    * sum m)) drawn by ``torch.randperm`` over the candidates in row-major order, on torch's global CPU
    generator (verl), or, with a ``generator``, on a CPU generator seeded by ``draw_seed`` (a 63-bit
    seed grpo_loss draws from it: a Generator cannot enter the custom op). Host syncs (the counts), as
    in verl.
    """
    x = logp.detach()
    shape = x.shape
    m = t["mask"].to(torch.float32)
    valid = m != 0
    a = Rows(shape, t.get("cu_seqlens")).tokens(t["advantages"])
    selected = torch.zeros(x.numel(), device=x.device, dtype=torch.float32)
    n = int(valid.sum())
    if n == 0:
        return selected.view(shape)
    if cfg.policy.token_selection == "kl_cov":
        a_valid, x_valid = a[valid], x[valid]
        cov = (a_valid - a_valid.mean()) * (x_valid - x_valid.mean())
        top = torch.topk(cov, max(1, int(n * cfg.kl_cov_ratio)), largest=True).indices
        selected[torch.nonzero(valid.reshape(-1)).squeeze(1)[top]] = 1.0
        return selected.view(shape)
    count = m.sum()
    cov = (a - (a * m).sum() / (count + 1e-8)) * (x - (x * m).sum() / (count + 1e-8))
    ratio = torch.exp(x - (t["old"] if t["old"] is not None else x))
    clipped = -a * ratio.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high) > -a * ratio
    candidates = torch.nonzero(((cov < cfg.clip_cov_ub) & (cov > cfg.clip_cov_lb) & valid & ~clipped).reshape(-1))
    if len(candidates) > 0:
        generator = None if draw_seed is None else torch.Generator().manual_seed(int(draw_seed))
        order = torch.randperm(len(candidates), generator=generator).to(x.device)
        selected[candidates[order[: min(max(int(cfg.clip_cov_ratio * float(count)), 1), len(candidates))], 0]] = 1.0
    return selected.view(shape)
