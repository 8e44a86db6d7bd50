"""Plain-PyTorch references: the oracle for every kernel in ``grpo_kernels.ops``.

Everything here materializes every intermediate (the full ``[N, V]`` logits included) and
computes in float64. It is slow and memory hungry on purpose: it is the formula of
``docs/semantics.md`` written as directly as possible, so that the tests can compare
the fused kernels against something obviously right. Never call it on a production shape.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------
# Per-token log-probs and entropy
# ---------------------------------------------------------------------------------------------


def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    softcap: float | None = None,
):
    """Per-token log-prob (and entropy, logsumexp) of ``targets`` under ``softmax(z)``, with
    ``z = (hidden @ weight.T + bias) / T``, or ``z = softcap * tanh((hidden @ weight.T + bias) / softcap) / T``.

    hidden ``[..., D]``, weight ``[V, D]``, bias ``[V]``, targets ``[...]`` or ``[..., K]`` (K
    targets per row when ``targets.dim() == hidden.dim()``). Computes in float64 and returns
    float32 tensors: log-probs of the shape of ``targets`` (0 where ignored), then entropy and lse
    of hidden's leading shape if asked for (0 on rows with no live target); autograd flows to
    hidden, weight and bias (their gradients come back in their own dtype).
    """
    lead_shape = hidden.shape[:-1]
    hidden64 = hidden.reshape(-1, hidden.shape[-1]).double()
    logits = hidden64 @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if isinstance(temperature, torch.Tensor):  # one per row: hidden's leading shape (or broadcasting to it)
        temperature = temperature.double().expand(lead_shape).reshape(-1, 1)
    logits = logits / temperature
    flat_targets = targets.reshape(logits.shape[0], -1)
    valid = flat_targets != ignore_index
    log_probs = torch.log_softmax(logits, dim=-1)
    safe_targets = torch.where(valid, flat_targets, torch.zeros_like(flat_targets)).long()
    logp = log_probs.gather(-1, safe_targets)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    logp = logp.float().reshape(targets.shape)
    row_live = valid.any(-1)
    outputs = (logp,)
    if return_entropy:
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        entropy = torch.where(row_live, entropy, torch.zeros_like(entropy))
        outputs += (entropy.float().reshape(lead_shape),)
    if return_lse:
        lse = torch.logsumexp(logits, dim=-1)
        lse = torch.where(row_live, lse, torch.zeros_like(lse))
        outputs += (lse.float().reshape(lead_shape),)
    return outputs if len(outputs) > 1 else outputs[0]


def token_stats_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    topk: int | None = None,
) -> dict:
    """Every per-token output of ``token_logprobs(..., outputs=...)``, in float64 from the full
    logits, by their definitions (``docs/semantics.md``), written independently of the kernels:
    is_top1 is ``argmax(z) == target`` (torch's argmax returns the first maximum), the top-k a
    stable sort of -z (equal logits keep id order).

    ``temperature``: a float or a tensor broadcasting to hidden's leading shape. Returns a dict
    with keys ``logprobs`` (None without targets), ``entropy``, ``lse``, ``log_sum_sq_probs``,
    ``mean_logits``, ``is_top1`` (None unless one target per row), ``topk_logprobs``, ``topk_ids``
    (None without ``topk``): float32 (bool, int64), 0 / False / id 0 on rows with no live target;
    autograd flows to hidden, weight and bias through all the floats.
    """
    lead_shape = hidden.shape[:-1]
    hidden64 = hidden.reshape(-1, hidden.shape[-1]).double()
    logits = hidden64 @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.double().expand(lead_shape).reshape(-1, 1)
    z = logits / temperature
    log_p = torch.log_softmax(z, dim=-1)
    num_rows = z.shape[0]
    if targets is None:
        live = torch.ones(num_rows, 1, dtype=torch.bool, device=z.device)
        flat_targets = None
    else:
        flat_targets = targets.reshape(num_rows, -1)
        live = flat_targets != ignore_index
    row_live = live.any(-1)

    def per_row(values, zero=0.0):
        return torch.where(row_live, values, torch.zeros_like(values) + zero)

    out = {"logprobs": None, "is_top1": None, "topk_logprobs": None, "topk_ids": None}
    if flat_targets is not None:
        safe = torch.where(live, flat_targets, 0).long()
        logp = torch.where(live, log_p.gather(-1, safe), 0.0)
        out["logprobs"] = logp.float().reshape(targets.shape)
        if targets.shape == lead_shape:
            out["is_top1"] = per_row(z.argmax(-1) == safe[:, 0], False).reshape(lead_shape)
    out["entropy"] = per_row(-(log_p.exp() * log_p).sum(-1)).float().reshape(lead_shape)
    out["lse"] = per_row(torch.logsumexp(z, dim=-1)).float().reshape(lead_shape)
    out["log_sum_sq_probs"] = per_row(torch.log((2 * log_p).exp().sum(-1))).float().reshape(lead_shape)
    out["mean_logits"] = per_row(z.mean(-1)).float().reshape(lead_shape)
    if topk is not None:
        order = torch.sort(-z.detach(), dim=-1, stable=True).indices[:, :topk]
        values = torch.where(row_live[:, None], log_p.gather(-1, order), 0.0)
        out["topk_logprobs"] = values.float().reshape(*lead_shape, topk)
        out["topk_ids"] = torch.where(row_live[:, None], order, 0).reshape(*lead_shape, topk)
    return out


# ---------------------------------------------------------------------------------------------
# Distillation divergences
# ---------------------------------------------------------------------------------------------


def head_logits_reference(hidden, weight, bias=None, *, temperature=1.0, logit_scale=1.0, softcap=None):
    """``[N, V]`` float64 logits ``z = (softcap * tanh(scale * y / softcap) or scale * y) / T`` with
    ``y = hidden @ weight.T + bias`` (hidden ``[..., D]`` flattened to rows; ``temperature`` a float
    or a tensor of hidden's leading shape)."""
    logits = hidden.reshape(-1, hidden.shape[-1]).double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if isinstance(temperature, torch.Tensor):
        return logits / temperature.reshape(-1, 1).double()
    return logits / temperature


def _beta_family_reference(log_q, log_p, present, beta):
    """Over the last dim, the categories where ``present``: beta 0 KL(p || q), 1 KL(q || p), else
    beta KL(p || m) + (1 - beta) KL(q || m), m = (1 - beta) q + beta p (q: student, p: teacher)."""
    log_q = torch.where(present, log_q, 0.0)
    log_p = torch.where(present, log_p, 0.0)
    q = torch.where(present, log_q.exp(), 0.0)
    p = torch.where(present, log_p.exp(), 0.0)
    if beta == 0.0:
        return (p * (log_p - log_q)).sum(-1)
    if beta == 1.0:
        return (q * (log_q - log_p)).sum(-1)
    log_m = torch.where(present, torch.log((1 - beta) * q + beta * p), 0.0)
    return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)


def _coarse_grained_reference(log_probs, present, tail):
    """(log-probs, present) of the distribution on a top-k support: the k entries plus a tail of
    mass ``1 - min(sum, e^{-1e-7})`` (TRL's clamp), or the k entries renormalized."""
    probs = torch.where(present, log_probs.exp(), 0.0)
    mass = probs.sum(-1, keepdim=True)
    if tail == "bucket":
        tail_prob = 1.0 - torch.minimum(mass, torch.full_like(mass, math.exp(-1e-7)))
        return torch.cat([log_probs, tail_prob.log()], -1), torch.cat([present, torch.ones_like(present[:, :1])], -1)
    return torch.where(present, (probs / mass.clamp_min(1e-300)).log(), 0.0), present


def divergence_reference(
    student_hidden, student_weight, *, student_bias=None, teacher_hidden=None, teacher_weight=None,
    teacher_bias=None, teacher_topk_ids=None, teacher_topk_logprobs=None, mode="full", topk=None, topk_ids=None,
    beta=0.0, temperature=1.0, student_softcap=None, teacher_softcap=None, student_logit_scale=1.0,
    teacher_logit_scale=1.0, mask=None, topk_tail="bucket",
):
    """:func:`grpo_kernels.fused_divergence` with every ``[N, V]`` intermediate in float64.

    Returns float64 ``(divergence, student entropy, student top-k mass, teacher top-k mass, ids)``
    of hidden's leading shape (the masses and ids None for ``mode="full"``); autograd flows to the
    student's hidden, weight and bias through the divergence. ``mode="student_topk"`` takes the
    student's float64 top-``topk`` (ties: lower id), or ``topk_ids [..., k]`` when given (to score
    the ids the op chose).
    """
    lead_shape = student_hidden.shape[:-1]
    z_s = head_logits_reference(student_hidden, student_weight, student_bias, temperature=temperature,
                                logit_scale=student_logit_scale, softcap=student_softcap)
    log_ps = torch.log_softmax(z_s, dim=-1)
    entropy = -(log_ps.exp() * log_ps).sum(-1)
    rows = z_s.shape[0]
    if mode != "teacher_topk":
        z_t = head_logits_reference(teacher_hidden, teacher_weight, teacher_bias, temperature=temperature,
                                    logit_scale=teacher_logit_scale, softcap=teacher_softcap)
        log_pt = torch.log_softmax(z_t, dim=-1)
    student_mass = teacher_mass = ids = None
    if mode == "full":
        divergence = _beta_family_reference(log_ps, log_pt, torch.ones_like(log_ps, dtype=torch.bool), beta)
    else:
        if mode == "teacher_topk":
            ids = teacher_topk_ids.reshape(rows, -1).long()
            teacher_logp = teacher_topk_logprobs.reshape(rows, -1).double()
            present = teacher_logp > -math.inf
        else:
            if topk_ids is not None:
                ids = topk_ids.reshape(rows, -1).long()
            else:  # a stable descending sort keeps ties in id order
                ids = torch.sort(z_s.detach(), dim=-1, descending=True, stable=True).indices[:, :topk]
            present = ids >= 0  # -1: a masked row's
            teacher_logp = log_pt.gather(-1, ids.clamp_min(0))
        student_logp = log_ps.gather(-1, ids.clamp_min(0))
        student_mass = torch.where(present, student_logp.exp(), 0.0).sum(-1).detach()
        teacher_mass = torch.where(present, teacher_logp.exp(), 0.0).sum(-1)
        log_q, categories = _coarse_grained_reference(student_logp, present, topk_tail)
        log_p, _ = _coarse_grained_reference(teacher_logp, present, topk_tail)
        divergence = _beta_family_reference(log_q, log_p, categories, beta)
    if mask is not None:
        keep = mask.reshape(-1) != 0
        divergence = torch.where(keep, divergence, 0.0)
        entropy = torch.where(keep, entropy, 0.0)
        if student_mass is not None:
            student_mass = torch.where(keep, student_mass, 0.0)
            teacher_mass = torch.where(keep, teacher_mass, 0.0)
    entropy = entropy.detach()
    shaped = [t.reshape(lead_shape) if t is not None else None for t in (divergence, entropy, student_mass,
                                                                         teacher_mass)]
    return (*shaped, ids.reshape(*lead_shape, -1) if ids is not None else None)


# ---------------------------------------------------------------------------------------------
# Group advantages
# ---------------------------------------------------------------------------------------------


def group_advantages_reference(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    index: torch.Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-4,
    reward_weights=None,
    keep_mask: torch.Tensor | None = None,
    multi_objective_aggregation: str = "sum_then_normalize",
):
    """Group-relative advantages, one group at a time, in float64, from the contract.

    rewards ``[B]`` or ``[B, K]`` (NaN = could not score), keep_mask ``[B]`` bool; groups of
    ``group_size`` consecutive rows, or ``index [B]`` (a group id per row; group g is the g-th
    smallest id). Returns ``(advantages [B], group_mean [G], group_std [G], zero_std [G])``,
    float64 and bool, G the number of groups.
    Conventions (also those of ``grpo_kernels.ops.advantages``): a completion with every component
    NaN, or not kept, is *excluded*: out of every statistic, advantage 0; the std of fewer than
    two values is 0; a group with no included value has mean 0; zero_std is std <= 1e-8
    (TRL's ``torch.isclose(std, 0)``); group_std is the group's own std for every scale.

    ``multi_objective_aggregation="normalize_then_sum"`` (GDPO): per function k and group,
    z_k = (r_k - mean_k) / (std_k + eps) over the included completions it scored (no division for
    ``scale="none"``); r = sum_k w_k z_k over the scored components; advantages
    (r - mean_batch(r)) / (std_batch(r) + eps); the group statistics are those of r.
    """
    per_function = rewards.detach().double().cpu()
    if per_function.dim() == 1:
        per_function = per_function[:, None]
    batch, num_functions = per_function.shape
    weights = torch.ones(num_functions, dtype=torch.float64)
    if reward_weights is not None:
        weights = torch.as_tensor(reward_weights, dtype=torch.float64).cpu().reshape(num_functions)
    scored = ~torch.isnan(per_function)
    included = scored.any(dim=1)
    if keep_mask is not None:
        included &= keep_mask.detach().cpu().bool()
    if index is None:
        groups = [list(range(g * group_size, (g + 1) * group_size)) for g in range(batch // group_size)]
    else:
        ids = index.tolist()
        groups = [[i for i in range(batch) if ids[i] == gid] for gid in sorted(set(ids))]
    num_groups = len(groups)
    group_of = {i: g for g, members in enumerate(groups) for i in members}

    def mean_and_std(values: torch.Tensor) -> tuple[float, float]:
        mean = values.mean().item() if values.numel() > 0 else 0.0
        std = values.std(correction=1).item() if values.numel() > 1 else 0.0
        return mean, std

    reward = torch.zeros(batch, dtype=torch.float64)
    if multi_objective_aggregation == "sum_then_normalize":
        # r_i = sum_k w_k r_ik over the components that scored.
        for i in range(batch):
            for k in range(num_functions):
                if scored[i, k]:
                    reward[i] += weights[k] * per_function[i, k]
    elif multi_objective_aggregation == "normalize_then_sum":
        if scale not in ("group", "none"):
            raise ValueError(f"GDPO takes scale 'group' or 'none', got {scale!r}")
        for members in groups:
            for k in range(num_functions):
                uses = [i for i in members if included[i] and scored[i, k]]
                mean_k, std_k = mean_and_std(per_function[uses, k])
                for i in uses:
                    z = per_function[i, k] - mean_k
                    if scale == "group":
                        z = z / (std_k + eps)
                    reward[i] += weights[k] * z
    else:
        raise ValueError(f"unknown multi_objective_aggregation {multi_objective_aggregation!r}")

    group_mean = torch.zeros(num_groups, dtype=torch.float64)
    group_std = torch.zeros(num_groups, dtype=torch.float64)
    for g, members in enumerate(groups):
        members = torch.tensor(members, dtype=torch.long)
        group_mean[g], group_std[g] = mean_and_std(reward[members][included[members]])
    batch_mean, batch_std = mean_and_std(reward[included])

    advantages = torch.zeros(batch, dtype=torch.float64)
    for i in range(batch):
        if not included[i]:
            continue
        g = group_of[i]
        if multi_objective_aggregation == "normalize_then_sum":
            advantages[i] = (reward[i] - batch_mean) / (batch_std + eps)
            continue
        centered = reward[i] - group_mean[g]
        if scale == "group":
            advantages[i] = centered / (group_std[g] + eps)
        elif scale == "batch":
            advantages[i] = centered / (batch_std + eps)
        elif scale == "none":
            advantages[i] = centered
        else:
            raise ValueError(f"unknown scale {scale!r}")
    return advantages, group_mean, group_std, group_std <= 1e-8


# ---------------------------------------------------------------------------------------------
# verl 0.9.1's advantage estimators (verl/trainer/ppo/core_algos.py, compute_*_advantage)
# ---------------------------------------------------------------------------------------------


def _whiten_reference(values, mask):
    """verl_F.masked_whiten, element by element: mean and Bessel variance over the mask (weighted
    by it, means over sum(mask) + 1e-8), then (v - mean) / sqrt(var + 1e-8)."""
    cells = [(v, m) for v, m in zip(values.flatten().tolist(), mask.flatten().tolist()) if m != 0]
    total = sum(m for _, m in cells)
    mean = sum(v * m for v, m in cells) / (total + 1e-8)
    variance = sum((v - mean) ** 2 * m for v, m in cells) / (total + 1e-8) * total / (total - 1)
    return (values - mean) / (variance + 1e-8) ** 0.5


def advantage_estimator_reference(
    name, token_level_rewards, response_mask, index=None, *, epsilon=None, norm_adv_by_std_in_grpo=True,
    gamma=1.0, f_norm=1.0, handle_zero_tail=True, reward_baselines=None, old_logprobs=None, sum_pi_squared=None,
    rollout_is_ratio=None, reward_components=None, reward_weights=None,
):
    """verl 0.9.1's estimator ``name`` in float64, one group and one timestep at a time.

    ``token_level_rewards``, ``response_mask`` ``[B, T]``; ``index`` a sequence of B group ids.
    Written from the loops of ``compute_<name>_(outcome_)advantage`` in
    ``verl/trainer/ppo/core_algos.py`` (0.9.1); returns ``(advantages, returns)`` ``[B, T]`` float64.
    """
    rewards = token_level_rewards.detach().double().cpu()
    mask = response_mask.detach().double().cpu()
    batch, horizon = rewards.shape
    ids = None if index is None else [int(i) for i in (index.tolist() if hasattr(index, "tolist") else index)]
    groups = {}
    for i in range(batch if ids is not None else 0):
        groups.setdefault(ids[i], []).append(i)
    scores = rewards.sum(dim=-1)
    zeros = torch.zeros(batch, horizon, dtype=torch.float64)

    def stats(values, members):  # verl: a group of one has mean 0 and std 1
        if len(members) == 1:
            return 0.0, 1.0
        picked = torch.stack([values[i] for i in members])
        return picked.mean().item(), picked.std().item()

    def grpo_scalars(values, eps):
        out = torch.zeros(batch, dtype=torch.float64)
        for members in groups.values():
            mean, std = stats(values, members)
            for i in members:
                out[i] = (values[i] - mean) / (std + eps) if norm_adv_by_std_in_grpo else values[i] - mean
        return out

    def outcome(per_row):
        advantages = per_row[:, None] * mask
        return advantages, advantages.clone()

    def reward_to_go():
        out = zeros.clone()
        for i in range(batch):
            running = 0.0
            for t in reversed(range(horizon)):
                running += rewards[i, t].item() * mask[i, t].item()
                out[i, t] = running
        return out

    eps = 1e-6 if epsilon is None else epsilon
    if name in ("grpo", "grpo_vectorized"):
        return outcome(grpo_scalars(scores, eps))
    if name == "gdpo":
        components = scores[:, None] if reward_components is None else reward_components.detach().double().cpu()
        weights = [1.0] * components.shape[1] if reward_weights is None else [float(w) for w in reward_weights]
        total = sum(w * grpo_scalars(components[:, k], eps) for k, w in enumerate(weights))
        advantages = _whiten_reference(total[:, None] * mask, mask) * mask
        return advantages, advantages.clone()
    if name in ("rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "gpg", "opo"):
        per_row = torch.zeros(batch, dtype=torch.float64)
        alpha = batch / max(int((scores != 0).sum()), 1)
        lengths = mask.sum(dim=-1)
        for members in groups.values():
            n = len(members)
            mean = scores[members].mean().item() if n > 1 else 0.0
            if name == "opo" and n > 1:
                total_length = sum(lengths[i].item() for i in members)
                mean = sum(lengths[i].item() * scores[i].item() for i in members) / total_length if total_length else 0.0
            for i in members:
                s = scores[i].item()
                if name == "rloo":
                    per_row[i] = s * n / (n - 1) - mean * n / (n - 1) if n > 1 else s
                elif name == "rloo_vectorized":
                    per_row[i] = (n * s - sum(scores[j].item() for j in members)) / (n - 1) if n > 1 else 0.0
                elif name == "gpg":
                    per_row[i] = alpha * (s - mean) / f_norm
                else:
                    per_row[i] = s - mean
        if name == "reinforce_plus_plus_baseline":
            advantages = _whiten_reference(per_row[:, None] * mask, mask) * mask
            return advantages, advantages.clone()
        return outcome(per_row)
    if name == "grpo_passk":
        per_row = torch.zeros(batch, dtype=torch.float64)
        for members in groups.values():
            ranked = sorted(members, key=lambda i: -scores[i].item())
            advantage = scores[ranked[0]].item() - scores[ranked[1]].item()
            if norm_adv_by_std_in_grpo:
                advantage /= scores[members].std().item() + eps
            per_row[ranked[0]] = advantage
        return outcome(per_row)
    if name == "reinforce_plus_plus":
        returns = zeros.clone()
        for i in range(batch):
            running = 0.0
            for t in reversed(range(horizon)):
                m = mask[i, t].item()
                step = rewards[i, t].item() + gamma * running
                returns[i, t] = step * m
                running = step * m + running * (1 - m)
        return _whiten_reference(returns, mask) * mask, returns
    if name == "remax":
        returns = reward_to_go()
        return returns - reward_baselines.detach().double().cpu()[:, None] * mask, returns
    if name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        eps = 1e-8 if epsilon is None else epsilon
        returns = reward_to_go()
        w = 1 - 2 * old_logprobs.detach().double().cpu().exp() + sum_pi_squared.detach().double().cpu()
        if rollout_is_ratio is not None:
            w = w * rollout_is_ratio.detach().double().cpu() ** 2
        path = (w * mask).cumsum(dim=-1)
        # the steps each row takes part in: every position (OTB) or its response tokens packed
        # to the left (multi-turn OTB: step k is the row's k-th response token)
        steps = {}
        for i in range(batch):
            if name == "optimal_token_baseline":
                steps[i] = list(range(horizon))
            else:
                steps[i] = [t for t in range(horizon) if mask[i, t] != 0]
        weight = {i: [path[i, t].item() * (mask[i, t].item() if name == "optimal_token_baseline" else 1.0)
                      for t in steps[i]] for i in range(batch)}
        length = {i: (mask[i].sum().item() if name == "optimal_token_baseline" else len(steps[i])) for i in range(batch)}
        advantages = zeros.clone()
        for members in groups.values():
            if name == "tir_optimal_token_baseline":
                members = [i for i in members if length[i] > 0]
            baseline = {i: [0.0] * len(steps[i]) for i in members}
            if len(members) > 1:
                for k in range(max(len(steps[i]) for i in members)):
                    num = sum(returns[i, steps[i][k]].item() * weight[i][k] for i in members if k < len(steps[i]))
                    den = sum(weight[i][k] for i in members if k < len(steps[i]))
                    for i in members:
                        if k < len(steps[i]):
                            baseline[i][k] = num / (den + eps)
                if handle_zero_tail:
                    ordered = sorted(length[i] for i in members)
                    longest = [i for i in members if length[i] == ordered[-1]]
                    if len(longest) == 1 and ordered[-1] > ordered[-2]:
                        for k in range(int(ordered[-2]), len(steps[longest[0]])):
                            baseline[longest[0]][k] = 0.0
            for i in members:
                for k, t in enumerate(steps[i]):
                    advantages[i, t] = (returns[i, t].item() - baseline[i][k]) * mask[i, t].item()
        return advantages, returns
    raise ValueError(f"unknown estimator {name!r}")


# ---------------------------------------------------------------------------------------------
# GRPO-family policy loss
# ---------------------------------------------------------------------------------------------


def kl_estimate_reference(logp, ref, estimator=None):
    """Per-token KL estimate of ``docs/semantics.md`` in float64 (autograd gives its gradient).

    ``None``: TRL's unclamped k3. verl's ``kl_penalty`` names otherwise; a ``+`` suffix keeps the
    value and takes k2's gradient (straight-through).
    """
    if estimator is not None and estimator.endswith("+"):
        k2 = 0.5 * (logp - ref) ** 2
        return k2 - k2.detach() + kl_estimate_reference(logp, ref, estimator[:-1]).detach()
    if estimator is None:
        return torch.exp(ref - logp) - (ref - logp) - 1
    if estimator in ("kl", "k1"):
        return logp - ref
    if estimator == "abs":
        return (logp - ref).abs()
    if estimator in ("mse", "k2"):
        return 0.5 * (logp - ref) ** 2
    if estimator in ("low_var_kl", "k3"):
        d = torch.clamp(ref - logp, -20, 20)
        return torch.clamp(torch.exp(d) - d - 1, -10, 10)
    raise ValueError(f"unknown kl estimator {estimator!r}")


def grpo_loss_reference(
    logprobs,
    completion_mask,
    advantages,
    *,
    old_logprobs=None,
    ref_logprobs=None,
    entropy=None,
    beta=0.0,
    loss_type="dapo",
    epsilon_low=0.2,
    epsilon_high=None,
    delta=None,
    clip_ratio_c=None,
    kl_estimator=None,
    importance_sampling_level="token",
    max_completion_length=None,
    num_items_in_batch=None,
    loss_agg_mode=None,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
    rollout_is_ratio=None,
    rollout_is_mode=None,
    rollout_is_clip_min=None,
    rollout_is_clip_max=3.0,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    use_bias_correction_kl=False,
    entropy_coef=0.0,
    top_entropy_quantile=1.0,
    sampling_logprobs=None,
    off_policy_mask_threshold=None,
    cispo_ratio_min=0.0,
    kl_cov_ratio=2e-4,
    ppo_kl_coef=1.0,
    clip_cov_ratio=2e-4,
    clip_cov_lb=1.0,
    clip_cov_ub=5.0,
    generator=None,
    dro_beta=None,
    adv_tau=1.0,
    kl_tau=1e-3,
    ipo_threshold=0.1,
    rollout_is=None,
    rollout_is_batch_normalize=False,
    rollout_rs=None,
    rollout_rs_threshold=None,
    rollout_rs_threshold_lower=None,
    bypass_mode=False,
    world_size=1,
):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` (and verl 0.9.1's variants) in float64, every intermediate materialized.

    Same arguments as ``grpo_kernels.grpo_loss`` (``world_size`` stands in for the process count).
    Returns ``(loss, metrics)``: a float64 loss differentiable w.r.t. ``logprobs`` and ``entropy``
    and a dict of float64 metrics (token-weighted means over the mask; NaN when not computable).
    """
    logp = logprobs.double()
    mask = completion_mask.double()
    B, T = logp.shape
    adv = advantages.detach().double()
    adv = adv.reshape(B, -1)  # [B, 1] or [B, T]
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    old = logp.detach() if old_logprobs is None else old_logprobs.detach().double()
    entropy64 = None if entropy is None else entropy.double()

    # rollout correction (verl's rollout_corr_helper): rejected tokens leave the mask from here on; the
    # computed IS weight takes the place of a given rollout_is_ratio
    rs_keep = None
    if rollout_is is not None or rollout_rs is not None:
        train, rollout = (logp.detach(), old) if bypass_mode else (old, sampling_logprobs.detach().double())
        rs_keep, computed_is = rollout_correction_reference(
            train, rollout, mask, rollout_is=rollout_is, rollout_rs=rollout_rs, rs_threshold=rollout_rs_threshold,
            rs_threshold_lower=rollout_rs_threshold_lower)
        if computed_is is not None:
            rollout_is_ratio = computed_is

    entropy_mask = None
    if top_entropy_quantile < 1.0:
        # TRL's get_high_entropy_mask: threshold from the float32 entropies of the masked tokens
        local = entropy.detach()[completion_mask.bool()].float()
        if local.numel() == 0:
            entropy_mask = torch.zeros_like(mask, dtype=torch.bool)
        else:
            threshold = torch.quantile(local, 1 - top_entropy_quantile)
            entropy_mask = ((entropy.detach().float() * completion_mask.float()) >= threshold) & completion_mask.bool()

    is_ratio = None
    if rollout_is_ratio is not None:
        is_ratio = rollout_is_ratio.detach().double().reshape(B, -1)
        if rollout_is_mode == "truncate":
            is_ratio = torch.clamp(is_ratio, min=rollout_is_clip_min, max=rollout_is_clip_max)
        elif rollout_is_mode == "mask":
            lo = -math.inf if rollout_is_clip_min is None else rollout_is_clip_min
            hi = math.inf if rollout_is_clip_max is None else rollout_is_clip_max
            is_ratio = is_ratio.masked_fill((is_ratio < lo) | (is_ratio > hi), 0.0)
        if rollout_is_batch_normalize:  # verl: the mean over the masked tokens / the sequences with a token
            if rollout_is == "token":
                weights_mean = (is_ratio * mask).sum() / (mask.sum() + 1e-8)
            else:
                seq_weights = (is_ratio * mask).sum(-1) / (mask.sum(-1) + 1e-8)
                seq_mask = (mask.sum(-1) > 0).double()
                weights_mean = (seq_weights * seq_mask).sum() / seq_mask.sum().clamp(min=1e-8)
            if weights_mean > 1e-8:
                is_ratio = is_ratio / weights_mean
    rejected_fraction = None
    if rs_keep is not None:
        rejected_fraction = (mask * (~rs_keep).double()).sum() / mask.sum().clamp(min=1.0)
        mask = mask * rs_keep.double()

    log_ratio = logp - old
    if loss_type == "rloo":  # TRL's RLOOTrainer: the summed log-ratio of the completion
        log_weights = (log_ratio * mask).sum(-1, keepdim=True)
    elif importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    if clip_ratio_c is not None:  # verl clamps the log-ratio before exp
        log_weights = torch.clamp(log_weights, -20.0, 20.0)
    coef_1 = torch.exp(log_weights)

    if ref_logprobs is not None:
        ref = ref_logprobs.detach().double()
        per_token_kl = kl_estimate_reference(logp, ref, kl_estimator)
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    phi_seq = None
    verl_flags = None
    if loss_type == "cispo":
        clamped = torch.clamp(coef_1, min=cispo_ratio_min, max=eps_high).detach()
        per_token_loss = -clamped * adv * logp
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
        if clip_ratio_c is not None:
            # dual clip: for A < 0, min(L, -A c)
            bounded = torch.min(per_token_loss, -adv * clip_ratio_c)
            clipped_lower = (per_token_loss > -adv * clip_ratio_c) & (adv < 0)
            per_token_loss = torch.where(adv < 0, bounded, per_token_loss)
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg).double()
        per_token_loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    elif loss_type == "vespo":
        # phi(w) = exp(lambda + k log w - lambda w), w from the summed (not mean) clamped log-ratio
        with torch.no_grad():
            seq_log_ratio = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
            if is_ratio is not None:
                seq_log_ratio = seq_log_ratio + torch.clamp(torch.log(is_ratio), math.log(1e-8), 20.0).sum(
                    -1, keepdim=True)
            log_w = torch.clamp(seq_log_ratio, math.log(1e-8), 20.0)
            nonneg = adv >= 0
            k = torch.where(nonneg, vespo_k_pos, vespo_k_neg).double()
            lam = torch.where(nonneg, vespo_lambda_pos, vespo_lambda_neg).double().clamp(min=1e-4)
            phi_seq = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token_loss = -phi_seq * adv * logp
    elif loss_type in ("gpg", "reinforce"):  # verl's compute_policy_loss_gpg / _reinforce
        per_token_loss = -adv * logp
    elif loss_type == "dro":  # verl's compute_policy_loss_dro
        per_token_loss = -(logp * adv - 0.5 * dro_beta * log_ratio.square())
    elif loss_type == "rloo":  # TRL's RLOOTrainer._compute_loss: PPO clip of the summed sequence ratio
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + eps_high)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)  # [B, 1]: one loss per completion
    elif loss_type in ("prime_dppo", "ipo"):  # prime-rl's default_loss_fn / ipo_loss_fn
        probs_diff = torch.exp(logp.detach()) - torch.exp(old)
        if loss_type == "prime_dppo":
            too_high, too_low = probs_diff > eps_high, probs_diff < -epsilon_low
            is_masked = torch.where(adv > 0, too_high, too_low)
            prime_flags = {"low": too_low & (adv < 0), "high": too_high & (adv > 0)}
        else:
            is_masked = probs_diff.abs() > ipo_threshold
            prime_flags = {"low": is_masked & (probs_diff < 0), "high": is_masked & (probs_diff > 0)}
        per_token_loss = -(~is_masked).double() * adv_tau * adv * torch.exp(log_ratio) + kl_tau * log_ratio ** 2
    elif loss_type in VERL_LOSS_TYPES:
        per_token_loss, verl_flags = verl_policy_reference(
            loss_type, logp, old, adv, completion_mask, epsilon_low=epsilon_low, epsilon_high=eps_high,
            clip_ratio_c=clip_ratio_c, kl_cov_ratio=kl_cov_ratio, ppo_kl_coef=ppo_kl_coef,
            clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub, generator=generator)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    if off_policy_mask_threshold is not None:
        sampling = old if sampling_logprobs is None else sampling_logprobs.detach().double()
        kl_div = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
        avg_seq_kl = (kl_div * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        per_token_loss = per_token_loss * ((adv >= 0) | (avg_seq_kl <= off_policy_mask_threshold)).double()
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask.double()
    if is_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * is_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    per_token_loss = per_token_loss.expand(B, T)

    tokens_per_row = mask.sum(-1)
    if loss_agg_mode is None and loss_type in ("dppo_tv", "dppo_kl", "kl_cov", "clip_cov", "gpg", "dro", "prime_dppo",
                                               "ipo"):
        loss_agg_mode = "token-mean"  # verl's default (prime-rl: the sum over the global token count)
    if loss_agg_mode is None and loss_type == "reinforce":
        loss_agg_mode = "seq-mean-token-sum"  # compute_policy_loss_reinforce's default
    if loss_agg_mode is None and loss_type == "geo_mean":
        # GMPO: the mean over all B rows of -A_i rho_i, A_i = sum_t m A_t / (sum_t m + 1e-8)
        loss = ((per_token_loss * mask).sum(-1) / (tokens_per_row + 1e-8)).mean()
    elif loss_agg_mode is not None:
        # verl's agg_loss (an empty micro-batch gives 0 here, NaN in verl)
        rows_with_tokens = (tokens_per_row > 0).double().sum()
        sequences = rows_with_tokens.clamp(min=1.0) if global_batch_size is None else float(global_batch_size)
        if loss_agg_mode == "token-mean":
            tokens = mask.sum().clamp(min=1.0) if batch_num_tokens is None else float(batch_num_tokens)
            loss = (per_token_loss * mask).sum() / tokens * dp_size
        elif loss_agg_mode == "token-sum":
            loss = (per_token_loss * mask).sum() * dp_size
        elif loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
            loss = (per_token_loss * mask).sum(-1).sum() / sequences * dp_size
            if loss_agg_mode == "seq-mean-token-sum-norm":
                loss = loss / (T if loss_scale_factor is None else loss_scale_factor)
        elif loss_agg_mode == "seq-mean-token-mean":
            loss = ((per_token_loss * mask).sum(-1) / (tokens_per_row + 1e-8)).sum() / sequences * dp_size
        else:
            raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")
    elif loss_type in ("grpo", "sapo", "rloo"):
        loss = ((per_token_loss * mask).sum(-1) / tokens_per_row.clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (B * max_completion_length)
    elif loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is not None:
            normalizer = torch.as_tensor(num_items_in_batch, dtype=torch.float64).clamp(min=1.0) / world_size
        else:
            normalizer = mask.sum().clamp(min=1.0)  # one process: its own tokens
        loss = (per_token_loss * mask).sum() / normalizer
    else:  # luspo
        loss = (per_token_loss * mask).sum(-1).mean()

    if entropy_coef != 0.0:
        effective = mask if entropy_mask is None else mask * entropy_mask.double()
        loss = loss - entropy_coef * (entropy64 * effective).sum() / effective.sum().clamp(min=1.0)

    def masked_mean(x):
        x = x.double().expand(B, T)
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    nan = torch.tensor(float("nan"), dtype=torch.float64)
    adv_bt = adv.expand(B, T)
    no_flag = torch.zeros(B, T, dtype=torch.bool)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "rloo"):
        is_low = (coef_1 < 1 - epsilon_low).expand(B, T) & (adv_bt < 0)
        is_high = (coef_1 > 1 + eps_high).expand(B, T) & (adv_bt > 0)
    elif loss_type == "cispo":
        is_low = no_flag
        is_high = (coef_1 > eps_high) & (adv_bt > 0)
    elif verl_flags is not None:
        is_low, is_high = verl_flags["low"], verl_flags["high"]
    elif loss_type in ("prime_dppo", "ipo"):
        is_low, is_high = prime_flags["low"].expand(B, T), prime_flags["high"].expand(B, T)
    else:
        is_low = is_high = no_flag
    metrics = {
        "kl": masked_mean(per_token_kl.detach()) if ref_logprobs is not None else nan,
        "clip_ratio/low_mean": masked_mean(is_low),
        "clip_ratio/high_mean": masked_mean(is_high),
        "clip_ratio/region_mean": masked_mean(is_low | is_high),
        "entropy": masked_mean(entropy64.detach()) if entropy is not None else nan,
    }
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        metrics["pg_clipfrac_lower"] = masked_mean(clipped_lower) if clip_ratio_c is not None else masked_mean(no_flag)
    if loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = phi_seq.mean()  # TRL: a mean over completions
    if loss_type in ("dppo_tv", "dppo_kl"):
        metrics["pg_clipfrac_lower"] = masked_mean(verl_flags["lower"])
    if loss_type in ("kl_cov", "clip_cov"):
        metrics["cov/selected_mean"] = masked_mean(verl_flags["selected"])
    if rollout_is is not None or rollout_rs is not None:
        metrics["rollout_is/mean"] = (masked_mean(is_ratio) if is_ratio is not None
                                      else masked_mean(torch.ones(B, T, dtype=torch.float64)))
        metrics["rollout_rs/masked_fraction"] = (rejected_fraction if rejected_fraction is not None
                                                 else torch.zeros((), dtype=torch.float64))
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# verl 0.9.1's policy terms: GMPO, DPPO, KL-Cov / Clip-Cov (per-token losses from the formulas)
# ---------------------------------------------------------------------------------------------


def covariance_selection_reference(kind, logprobs, advantages, completion_mask, *, old_logprobs=None,
                                   epsilon_low=0.2, epsilon_high=0.2, ratio=2e-4, lb=1.0, ub=5.0,
                                   generator=None):
    """The tokens KL-Cov / Clip-Cov single out, over the micro-batch's masked tokens (float64).

    cov_t = (A_t - mean A) (logp_t - mean logp), means over the masked tokens (Clip-Cov: verl's
    masked_mean, sum / (n + 1e-8)). ``"kl_cov"``: the top max(1, floor(ratio * n)) tokens by cov.
    ``"clip_cov"``: among masked tokens not already clipped (-A clip(r) > -A r) with lb < cov < ub,
    max(1, floor(ratio * sum m)) drawn uniformly without replacement: ``torch.randperm`` over the
    candidates in row-major order, on torch's global CPU generator (verl), or on a CPU generator
    seeded by a 63-bit seed drawn from ``generator``.
    Returns a ``[B, T]`` bool tensor.
    """
    logp = logprobs.detach().double()
    adv = advantages.detach().double().reshape(logp.shape[0], -1).expand_as(logp)
    valid = completion_mask.detach() > 0
    n = int(valid.sum())
    selected = torch.zeros_like(valid)
    if n == 0:
        return selected
    if kind == "kl_cov":
        cov = (adv[valid] - adv[valid].mean()) * (logp[valid] - logp[valid].mean())
        count = max(1, int(n * ratio))
        flat = torch.nonzero(valid.reshape(-1)).squeeze(1)
        selected.view(-1)[flat[torch.topk(cov, count, largest=True).indices]] = True
        return selected
    if kind != "clip_cov":
        raise ValueError(f"unknown covariance selection {kind!r}")
    m = completion_mask.detach().double()
    mean_adv = (adv * m).sum() / (m.sum() + 1e-8)
    mean_logp = (logp * m).sum() / (m.sum() + 1e-8)
    cov = (adv - mean_adv) * (logp - mean_logp)
    old = logp if old_logprobs is None else old_logprobs.detach().double()
    r = torch.exp(logp - old)
    clipped = (-adv * r.clamp(1 - epsilon_low, 1 + epsilon_high) > -adv * r) & valid
    candidates = torch.nonzero((cov < ub) & (cov > lb) & valid & ~clipped)
    count = max(int(ratio * float(m.sum())), 1)
    if len(candidates) > 0:
        if generator is not None:  # grpo_kernels' convention: a 63-bit seed drawn from it seeds a CPU draw
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
            generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(candidates), generator=generator)
        chosen = candidates[order[: min(count, len(candidates))]]
        selected[chosen[:, 0], chosen[:, 1]] = True
    return selected


VERL_LOSS_TYPES = ("geo_mean", "dppo_tv", "dppo_kl", "kl_cov", "clip_cov")


def verl_policy_reference(loss_type, logprobs, old_logprobs, advantages, completion_mask, *, epsilon_low=0.2,
                          epsilon_high=None, clip_ratio_c=None, kl_cov_ratio=2e-4, ppo_kl_coef=1.0,
                          clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0, generator=None):
    """Per-token policy loss ``[B, T]`` (float64, differentiable w.r.t. ``logprobs``) and flags of
    verl's geo_mean, dppo_tv, dppo_kl, kl_cov and clip_cov, written from the formulas.

    For ``geo_mean`` the per-token loss is -A_t rho_i (rho_i the row's clipped geometric-mean ratio):
    averaged per row with sum_t m / (sum_t m + 1e-8) and then over rows it is GMPO's loss. Flags:
    ``low``/``high`` (clip_ratio/*), ``lower`` (DPPO's pg_clipfrac_lower) and ``selected`` (KL-Cov /
    Clip-Cov's covariance-selected tokens), ``[B, T]`` bool.
    """
    logp = logprobs.double()
    B, T = logp.shape
    old = old_logprobs.detach().double()
    adv = advantages.detach().double().reshape(B, -1).expand(B, T)
    mask = completion_mask.double()
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    l = logp - old
    none = torch.zeros(B, T, dtype=torch.bool)
    if loss_type == "geo_mean":
        s = torch.sign(adv)
        c = torch.clamp(l, -epsilon_low, eps_high)
        g = s * torch.min(s * l, s * c)
        n = mask.sum(-1, keepdim=True)
        rho = torch.exp((g * mask).sum(-1, keepdim=True) / (n + 1e-8))
        clipped = l.detach() != c.detach()
        return -adv * rho, {"low": clipped & (adv < 0), "high": clipped & (adv > 0)}
    if loss_type in ("dppo_tv", "dppo_kl"):
        cap = 20.0 if clip_ratio_c is None else clip_ratio_c
        r = torch.exp(torch.clamp(l.detach(), -20.0, 20.0))
        tis = torch.clamp(r, max=cap)
        p, q = torch.exp(logp.detach()), torch.exp(old)
        if loss_type == "dppo_tv":
            valid = torch.where(adv > 0, p - q <= eps_high, p - q >= -epsilon_low)
        else:
            b = q * (old - logp.detach()) + (1 - q) * torch.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
            valid = torch.where(adv > 0, (b <= eps_high) | (p <= q), (b <= epsilon_low) | (p >= q))
        invalid = ~valid
        return (-adv * tis * valid.double() * logp,
                {"low": invalid & (adv <= 0), "high": invalid & (adv > 0), "lower": (r > cap) & valid})
    if loss_type == "kl_cov":
        selected = covariance_selection_reference("kl_cov", logprobs, advantages, completion_mask,
                                                  ratio=kl_cov_ratio)
        loss = -adv * torch.exp(l) + selected.double() * ppo_kl_coef * l.abs()
        return loss, {"low": none, "high": none, "selected": selected}
    if loss_type == "clip_cov":
        selected = covariance_selection_reference(
            "clip_cov", logprobs, advantages, completion_mask, old_logprobs=old_logprobs, epsilon_low=epsilon_low,
            epsilon_high=eps_high, ratio=clip_cov_ratio, lb=clip_cov_lb, ub=clip_cov_ub, generator=generator)
        r = torch.exp(l)
        loss = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - epsilon_low, 1 + eps_high))
        low = (r.detach() < 1 - epsilon_low) & (adv < 0)
        high = (r.detach() > 1 + eps_high) & (adv > 0)
        return loss * (~selected).double(), {"low": low, "high": high, "selected": selected}
    raise ValueError(f"unknown verl loss type {loss_type!r}")


# ---------------------------------------------------------------------------------------------
# Rollout correction (verl 0.9.1's rollout_corr_helper; AReaL's KPop)
# ---------------------------------------------------------------------------------------------


def binary_kl_reference(log_p, log_q, eps=1e-8):
    """AReaL's compute_binary_kl_divergence in float64: KL(Bernoulli(p) || Bernoulli(q)), p and q
    clamped into [eps, 1 - eps]."""
    p = torch.clamp(torch.exp(log_p), eps, 1.0 - eps)
    q = torch.clamp(torch.exp(log_q), eps, 1.0 - eps)
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


def rejection_statistic_reference(train, rollout, mask, rollout_rs):
    """The statistic of rejection criterion ``rollout_rs`` (``{token,seq_sum,seq_mean,seq_max}_{k1,k2,k3,kpop}``)
    in float64: ``[B, T]`` per token, or ``[B, 1]`` per row (verl's masked_sum / masked_mean / masked
    max over the mask; a row without tokens gets 0 from the max)."""
    train, rollout, mask = train.double(), rollout.double(), mask.double()
    level, stat_name = rollout_rs.rsplit("_", 1)
    safe = (train - rollout).clamp(-20.0, 20.0)
    stat = {"k1": lambda: -safe, "k2": lambda: 0.5 * safe ** 2, "k3": lambda: torch.exp(safe) - 1.0 - safe,
            "kpop": lambda: torch.maximum(binary_kl_reference(train, rollout), binary_kl_reference(rollout, train)),
            }[stat_name]()
    valid = mask != 0
    if level == "seq_sum":
        return (torch.where(valid, stat, 0.0) * mask).sum(-1, keepdim=True)
    if level == "seq_mean":
        return (torch.where(valid, stat, 0.0) * mask).sum(-1, keepdim=True) / (mask.sum(-1, keepdim=True) + 1e-8)
    if level == "seq_max":
        stat = stat.masked_fill(~valid, float("-inf")).max(-1, keepdim=True).values
        return torch.where(stat == float("-inf"), 0.0, stat)
    return stat


def rollout_correction_reference(train, rollout, mask, *, rollout_is=None, rollout_rs=None, rs_threshold=None,
                                 rs_threshold_lower=None):
    """verl's compute_rollout_correction_weights / compute_rollout_rejection_mask in float64, one
    rejection criterion (and AReaL's KPop statistic, ``*_kpop``), before any truncation.

    ``train``/``rollout`` ``[B, T]`` log-probs, ``mask`` ``[B, T]``. Returns ``(keep [B, T] bool or
    None, raw IS weight [B, T] / [B, 1] or None)``: the weight exp(clamp(l, +-20)) per token or
    exp(clamp(sum_t m l, +-20)) per sequence, l = train - rollout; a token is kept when the
    statistic lies in [log(lower), log(upper)] (k1, lower = 1 / upper by default) or <= upper.
    """
    train, rollout, mask = train.double(), rollout.double(), mask.double()
    log_ratio = train - rollout
    weights = None
    if rollout_is == "token":
        weights = torch.exp(log_ratio.clamp(-20.0, 20.0))
    elif rollout_is == "sequence":
        weights = torch.exp((log_ratio * mask).sum(-1, keepdim=True).clamp(-20.0, 20.0))
    keep = None
    if rollout_rs is not None:
        stat = rejection_statistic_reference(train, rollout, mask, rollout_rs)
        if rollout_rs.endswith("_k1"):
            lower = 1.0 / rs_threshold if rs_threshold_lower is None else rs_threshold_lower
            keep = (stat >= math.log(lower)) & (stat <= math.log(rs_threshold))
        else:
            keep = stat <= rs_threshold
        keep = keep.expand_as(mask)
    return keep, weights
