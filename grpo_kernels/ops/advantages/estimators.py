"""verl 0.9.1's advantage estimators, one table (``ESTIMATORS``) of small functions.

Every estimator of verl's ``ADV_ESTIMATOR_REGISTRY`` but ``gae`` (a critic's values, not a
group statistic), with verl's semantics (``verl/trainer/ppo/core_algos.py``,
``compute_*_advantage``): token-level rewards and a response mask ``[B, T]`` in, ``(advantages,
returns)`` ``[B, T]`` out (or packed ``[N]`` with ``cu_seqlens``: every per-row operation goes
through ``batch.tokens``, ``tokens.py``), groups given by verl's ``index`` (a group id per row) or by
``group_size`` (contiguous groups). Adding an estimator is one entry of ``ESTIMATORS`` and one
small function below; the argument checks of ``estimate.py`` (``estimate_advantages``,
``validate_estimator_options``) and the table in docs/semantics.md are derived from the table.

Where the work is: the per-group reductions run on the group kernel (count, mean, std of the
sequence scores; ``group.group_statistics``) and the segment-sum kernel (per-timestep sums of the
Optimal Token Baseline, OPO's length-weighted mean; ``group.segment_sum``), or on their PyTorch
twins; what remains per estimator is a few elementwise operations on ``[B]`` or ``[B, T]``
tensors, written in PyTorch (the same code on both paths). All arithmetic is float64; outputs are
float32 (float64 for float64 rewards). verl computes in the rewards' dtype (float32): the two
agree to float32 rounding.

Conventions shared with verl: s_i = sum_t r_it (the unmasked row sum, as verl sums), n the number
of rows of i's group, mean / std (Bessel) over the group; where verl special-cases a group of one
row, the function below says so. Differences from verl (each also in docs/semantics.md):
rewards must be finite (verl has no "could not score"; a NaN would spread over its group); OPO's
group whose rows have no token gets baseline 0 (verl: 0/0 = NaN, times a zero mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable

import torch

from grpo_kernels.ops.advantages.group import group_statistics, segment_sum
from grpo_kernels.ops.advantages.layout import GroupLayout
from grpo_kernels.ops.advantages.tokens import PackedTokens, PaddedTokens

WHITEN_EPS = 1e-8  # verl_F.masked_whiten: (v - mean) * rsqrt(var + 1e-8), means over sum(mask) + 1e-8


@dataclass
class EstimatorBatch:
    """What an estimator function reads: float64 ``rewards`` and ``mask`` token tensors (``[B, T]``,
    or packed ``[N]``), their rows (``tokens``: ``tokens.PaddedTokens`` / ``PackedTokens``), the
    groups of the rows (None for estimators without groups), the backend of the group reductions,
    and the extra inputs its table entry declares (float64 tensors, token tensors in the layout of
    the rewards; ``reward_weights`` a float64 ``[K]``)."""

    rewards: torch.Tensor
    mask: torch.Tensor
    tokens: PaddedTokens | PackedTokens
    layout: GroupLayout | None
    backend: str
    inputs: dict = field(default_factory=dict)

    def scores(self) -> torch.Tensor:
        return self.tokens.sum(self.rewards)

    def group_stats(self, values: torch.Tensor):
        """(count, mean, std) of each row's group, ``[B]`` float64 each (std 0 below two rows)."""
        count, mean, std = group_statistics(values, self.layout, backend=self.backend)
        rows = self.layout.group_of_row
        return count[rows], mean[rows], std[rows]

    def group_sums(self, values: torch.Tensor) -> torch.Tensor:
        """``values [B, C]`` -> ``[num_groups, C]``, each group's rows summed."""
        return segment_sum(values, self.layout, backend=self.backend)


# ---------------------------------------------------------------------------------------------
# Shared pieces (verl_F.masked_whiten, the returns)
# ---------------------------------------------------------------------------------------------


def _outcome(batch: EstimatorBatch, per_row: torch.Tensor):
    """verl's outcome estimators: the row's scalar on every token (``a.unsqueeze(-1) * mask``),
    returns = advantages."""
    advantages = batch.tokens.spread(per_row) * batch.mask
    return advantages, advantages


def _masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl_F.masked_whiten: (v - mean) * rsqrt(var + 1e-8), mean and Bessel variance over the
    mask (weighted by its values, means divided by sum(mask) + 1e-8). verl raises below two tokens."""
    total = mask.sum()
    if float(total) <= 1.0:
        raise ValueError(f"whitening the advantages needs more than one response token in the batch "
                         f"(response_mask sums to {float(total):g}; verl raises too)")
    on = mask != 0
    mean = (torch.where(on, values, 0.0) * mask).sum() / (total + WHITEN_EPS)
    centered = values - mean
    variance = (torch.where(on, centered * centered, 0.0) * mask).sum() / (total + WHITEN_EPS)
    variance = variance * total / (total - 1.0)
    return centered * torch.rsqrt(variance + WHITEN_EPS)


def _reward_to_go(tokens, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = sum_{t' >= t} r_t' m_t' (verl: ``(r * m).flip(-1).cumsum(-1).flip(-1)``)."""
    return tokens.reverse_cumsum(rewards * mask)


def _discounted_returns(tokens, rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++'s returns: running_t = r_t m_t + running_{t+1} (1 - m_t (1 - gamma)) (a masked
    token passes the running return on undiscounted) and returns_t = m_t (r_t + gamma running_{t+1}),
    verl's loop. gamma = 1 is a reverse cumulative sum."""
    if gamma == 1.0:
        return mask * (rewards + tokens.following(_reward_to_go(tokens, rewards, mask)))
    returns = torch.zeros_like(rewards)
    if tokens.packed:  # step k: each row's k-th token from its end, for the rows that long
        running = rewards.new_zeros(tokens.num_rows)
        for k in range(tokens.horizon):
            alive = tokens.lengths > k
            at = tokens.cu_seqlens[1:][alive] - 1 - k
            step = rewards[at] + gamma * running[alive]
            returns[at] = step * mask[at]
            running[alive] = step * mask[at] + running[alive] * (1.0 - mask[at])
        return returns
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        step = rewards[:, t] + gamma * running
        returns[:, t] = step * mask[:, t]
        running = step * mask[:, t] + running * (1.0 - mask[:, t])
    return returns


# ---------------------------------------------------------------------------------------------
# The estimators: one small function each (verl 0.9.1 core_algos function named in the table)
# ---------------------------------------------------------------------------------------------


def _grpo_scores(batch: EstimatorBatch, scores, epsilon, norm_adv_by_std_in_grpo):
    count, mean, std = batch.group_stats(scores)
    single = count <= 1  # verl: a group of one row has mean 0 and std 1
    mean = torch.where(single, 0.0, mean)
    if not norm_adv_by_std_in_grpo:
        return scores - mean
    return (scores - mean) / (torch.where(single, 1.0, std) + epsilon)


def grpo(batch, *, epsilon, norm_adv_by_std_in_grpo):
    return _outcome(batch, _grpo_scores(batch, batch.scores(), epsilon, norm_adv_by_std_in_grpo))


def rloo(batch):
    scores = batch.scores()
    count, mean, _ = batch.group_stats(scores)
    loo = (scores - mean) * count / (count - 1.0).clamp(min=1.0)  # s - mean of the others
    return _outcome(batch, torch.where(count > 1, loo, scores))  # a group of one: s


def rloo_vectorized(batch):
    scores = batch.scores()
    count, mean, _ = batch.group_stats(scores)
    loo = (scores - mean) * count / (count - 1.0).clamp(min=1.0)
    return _outcome(batch, torch.where(count > 1, loo, 0.0))  # a group of one: 0 (unlike rloo)


def reinforce_plus_plus_baseline(batch):
    scores = batch.scores()
    count, mean, _ = batch.group_stats(scores)
    centered = scores - torch.where(count > 1, mean, 0.0)
    advantages = _masked_whiten(batch.tokens.spread(centered) * batch.mask, batch.mask) * batch.mask
    return advantages, advantages


def gpg(batch, *, f_norm):
    scores = batch.scores()
    count, mean, _ = batch.group_stats(scores)
    alpha = scores.shape[0] / (scores != 0).sum().double().clamp(min=1.0)  # B / (rows with a non-zero score)
    return _outcome(batch, alpha * (scores - torch.where(count > 1, mean, 0.0)) / f_norm)


def opo(batch):
    scores = batch.scores()
    lengths = batch.tokens.sum(batch.mask)
    sums = batch.group_sums(torch.stack([lengths * scores, lengths], dim=1))  # [num_groups, 2]
    baseline = torch.where(sums[:, 1] > 0, sums[:, 0] / sums[:, 1].clamp(min=1e-300), 0.0)
    rows = batch.layout.group_of_row
    count = batch.layout.group_sizes().to(torch.float64)[rows]
    return _outcome(batch, scores - torch.where(count > 1, baseline[rows], 0.0))


def grpo_passk(batch, *, epsilon, norm_adv_by_std_in_grpo):
    scores = batch.scores()
    layout = batch.layout
    sizes = layout.group_sizes()
    if bool((sizes < 2).any()):
        raise ValueError(f"grpo_passk needs at least 2 completions per group (verl raises too); "
                         f"the smallest group has {int(sizes.min())}")
    dense, _ = layout.to_dense(scores, -math.inf)
    top = dense.topk(2, dim=1)
    best = top.values[:, 0] - top.values[:, 1]  # only the best completion of a group gets a signal
    if norm_adv_by_std_in_grpo:
        _, _, std = group_statistics(scores, layout, backend=batch.backend)
        best = best / (std + epsilon)
    winner = torch.zeros_like(dense).scatter_(1, top.indices[:, :1], best[:, None])
    return _outcome(batch, layout.from_dense(winner))


def gdpo(batch, *, epsilon, norm_adv_by_std_in_grpo):
    components = batch.inputs.get("reward_components")
    if components is None:
        components = batch.scores()[:, None]
    weights = batch.inputs.get("reward_weights")
    if weights is None:
        weights = torch.ones(components.shape[1], dtype=torch.float64, device=components.device)
    combined = sum(weights[k] * _grpo_scores(batch, components[:, k].contiguous(), epsilon, norm_adv_by_std_in_grpo)
                   for k in range(components.shape[1]))
    advantages = _masked_whiten(batch.tokens.spread(combined) * batch.mask, batch.mask) * batch.mask
    return advantages, advantages


def reinforce_plus_plus(batch, *, gamma):
    returns = _discounted_returns(batch.tokens, batch.rewards, batch.mask, gamma)
    return _masked_whiten(returns, batch.mask) * batch.mask, returns


def remax(batch):
    returns = _reward_to_go(batch.tokens, batch.rewards, batch.mask)
    return returns - batch.tokens.spread(batch.inputs["reward_baselines"]) * batch.mask, returns


def _path_weights(batch):
    """W_t = sum_{j <= t} m_j w_j with w = 1 - 2 p_t + sum_v p_v^2 (times rho^2 under rollout IS)."""
    weight = 1.0 - 2.0 * batch.inputs["old_logprobs"].exp() + batch.inputs["sum_pi_squared"]
    ratio = batch.inputs.get("rollout_is_ratio")
    if ratio is not None:
        weight = weight * ratio * ratio
    return batch.tokens.cumsum(weight * batch.mask)


def _token_baseline(batch, returns, path_weight, mask, lengths, members, handle_zero_tail, epsilon):
    """B_t = sum_g G_t W_t m_t / (sum_g W_t m_t + epsilon) over each group, for the rows of
    groups with at least two ``members``; with ``handle_zero_tail``, 0 past the second-longest
    member for the group's unique longest member. Returns the per-token baseline."""
    layout, tokens = batch.layout, batch.tokens
    horizon = tokens.horizon
    weighted = path_weight * mask
    sums = tokens.group_position_sums([returns * weighted, weighted], layout, batch.backend)
    baseline = sums[..., 0] / (sums[..., 1] + epsilon)  # [num_groups, horizon]
    dense_lengths, valid = layout.to_dense(torch.where(members, lengths, -math.inf), -math.inf)
    num_members = (valid & (dense_lengths > -math.inf)).sum(dim=1)
    rows = layout.group_of_row
    start_zero = torch.where(num_members[rows] > 1, horizon, 0)  # a lone member: no baseline
    if handle_zero_tail:
        longest = dense_lengths.amax(dim=1, keepdim=True)
        is_longest = (dense_lengths == longest) & (dense_lengths > -math.inf)
        unique = (is_longest.sum(dim=1) == 1) & (num_members > 1)
        second = torch.where(is_longest, -math.inf, dense_lengths).amax(dim=1)
        tail = layout.from_dense(is_longest & unique[:, None])
        start_zero = torch.where(tail, second.clamp(min=0.0).floor().to(start_zero.dtype)[rows], start_zero)
    return torch.where(tokens.positions() < tokens.spread(start_zero), tokens.at_positions(baseline, rows), 0.0)


def optimal_token_baseline(batch, *, handle_zero_tail, epsilon):
    returns = _reward_to_go(batch.tokens, batch.rewards, batch.mask)
    lengths = batch.tokens.sum(batch.mask)
    members = torch.ones_like(lengths, dtype=torch.bool)  # every row counts, empty ones too
    baseline = _token_baseline(batch, returns, _path_weights(batch), batch.mask, lengths, members,
                               handle_zero_tail, epsilon)
    return (returns - baseline) * batch.mask, returns


def tir_optimal_token_baseline(batch, *, handle_zero_tail, epsilon):
    # Multi-turn: each row's response tokens (mask != 0) are packed to the left, so that step t
    # is every trajectory's t-th response token whatever tool output came before it; rows with
    # no response token leave their group. Then the baseline above, and back in place.
    tokens = batch.tokens
    returns = _reward_to_go(tokens, batch.rewards, batch.mask)
    present = batch.mask != 0
    lengths = tokens.sum(present.to(returns.dtype))
    source = present.reshape(-1).nonzero().squeeze(1)  # flat index of each response token
    slot = tokens.cumsum(present.to(returns.dtype)).reshape(-1)[source].long() - 1
    target = tokens.row_start(source) + slot  # its place once its row is packed to the left

    def packed(values):
        out = values.new_zeros(values.shape)  # (contiguous: written through its flat view)
        out.view(-1)[target] = values.reshape(-1)[source]
        return out

    packed_mask = (tokens.positions() < tokens.spread(lengths)).to(returns.dtype)
    packed_returns = packed(returns)
    baseline = _token_baseline(batch, packed_returns, packed(_path_weights(batch)), packed_mask, lengths,
                               lengths > 0, handle_zero_tail, epsilon)
    advantages = returns.new_zeros(returns.shape)
    advantages.view(-1)[source] = (packed_returns - baseline).reshape(-1)[target]
    return advantages * batch.mask, returns


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    default: object
    kind: str  # "positive": a finite number > 0; "unit": a number in [0, 1]; "bool"
    meaning: str

    def check(self, name: str, value):
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        value = float(value)
        if self.kind == "positive" and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
        if self.kind == "unit" and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
        return value


OPTIONS = {
    "epsilon": Option(1e-6, "positive", "added to the group std (GRPO family; verl's default 1e-6) or to the "
                                        "baseline's denominator (Optimal Token Baseline; 1e-8)"),
    "norm_adv_by_std_in_grpo": Option(True, "bool", "divide by the group std (False: Dr. GRPO's centering only)"),
    "gamma": Option(1.0, "unit", "discount of the returns (verl's algorithm.gamma)"),
    "f_norm": Option(1.0, "positive", "GPG's divisor of the centered score"),
    "handle_zero_tail": Option(True, "bool", "baseline 0 past the second-longest completion for a group's unique "
                                             "longest one"),
}

# Tensor inputs: name -> (shape, meaning). reward_weights is a sequence of K numbers or a [K] tensor.
INPUTS = {
    "reward_baselines": ("[B]", "the reward of the greedy completion (ReMax)"),
    "old_logprobs": ("[B, T]", "log-prob of each sampled token under the rollout policy"),
    "sum_pi_squared": ("[B, T]", "sum_v p_v^2 of each position's next-token distribution"),
    "rollout_is_ratio": ("[B, T]", "rollout importance-sampling weights (verl's rollout_is_weights)"),
    "reward_components": ("[B, K]", "one score per reward function (verl's gdpo_reward_keys); default: the row "
                                    "sums of token_level_rewards"),
    "reward_weights": ("[K]", "weights of reward_components (verl's gdpo_reward_weights); default 1"),
}


@dataclass(frozen=True)
class Estimator:
    """One advantage estimator: ``compute(batch, **options) -> (advantages, returns)`` float64
    ``[B, T]``; ``formula``: the advantage in words (docs); ``grouped``: reads groups (``index``
    or ``group_size``); ``options``: the scalar options it reads (``OPTIONS``), with
    ``defaults`` overriding their defaults; ``inputs`` / ``optional_inputs``: tensors of
    ``INPUTS`` it requires / accepts; ``verl_function``: verl 0.9.1's function it reproduces."""

    compute: Callable
    formula: str
    verl_function: str
    grouped: bool = True
    options: tuple = ()
    defaults: dict = field(default_factory=dict)
    inputs: tuple = ()
    optional_inputs: tuple = ()


_GRPO_OPTIONS = ("epsilon", "norm_adv_by_std_in_grpo")

ESTIMATORS = {
    "grpo": Estimator(
        grpo, "(s - mean) / (std + epsilon) (norm_adv_by_std_in_grpo=False: s - mean); a group of one: mean 0, "
              "std 1",
        "compute_grpo_outcome_advantage", options=_GRPO_OPTIONS),
    "grpo_vectorized": Estimator(
        grpo, "as grpo (verl's vectorized implementation of the same formula)",
        "compute_grpo_vectorized_outcome_advantage", options=_GRPO_OPTIONS),
    "gdpo": Estimator(
        gdpo, "whiten(sum_k w_k grpo(s_k)) over the batch's tokens (masked_whiten)",
        "compute_gdpo_outcome_advantage", options=_GRPO_OPTIONS,
        optional_inputs=("reward_components", "reward_weights")),
    "grpo_passk": Estimator(
        grpo_passk, "the group's best completion: (s_max - s_second) / (std + epsilon); the others 0; groups of "
                    ">= 2", "compute_grpo_passk_outcome_advantage", options=_GRPO_OPTIONS),
    "rloo": Estimator(
        rloo, "(s - mean) n / (n - 1), i.e. s minus the mean of the others; a group of one: s",
        "compute_rloo_outcome_advantage"),
    "rloo_vectorized": Estimator(
        rloo_vectorized, "as rloo, but a group of one gets 0", "compute_rloo_vectorized_outcome_advantage"),
    "reinforce_plus_plus_baseline": Estimator(
        reinforce_plus_plus_baseline, "whiten(s - mean) over the batch's tokens (a group of one: mean 0)",
        "compute_reinforce_plus_plus_baseline_outcome_advantage"),
    "opo": Estimator(
        opo, "s - sum_g(L s) / sum_g(L), L the row's token count (length-weighted mean); a group of one: s",
        "compute_opo_outcome_advantage"),
    "gpg": Estimator(
        gpg, "alpha (s - mean) / f_norm, alpha = B / #(rows with s != 0); a group of one: mean 0",
        "compute_gpg_outcome_advantage", options=("f_norm",)),
    "reinforce_plus_plus": Estimator(
        reinforce_plus_plus, "whiten(G_t) over the batch's tokens, G_t the gamma-discounted return-to-go "
                             "(masked tokens pass it on)", "compute_reinforce_plus_plus_outcome_advantage",
        grouped=False, options=("gamma",)),
    "remax": Estimator(
        remax, "G_t - b m_t, G_t the return-to-go, b reward_baselines", "compute_remax_outcome_advantage",
        grouped=False, inputs=("reward_baselines",)),
    "optimal_token_baseline": Estimator(
        optimal_token_baseline, "G_t - B_t, B_t = sum_g G_t W_t / (sum_g W_t + epsilon) per timestep, W_t = "
                                "sum_{j<=t} (1 - 2 p_j + sum p^2) (rho_j^2)", "compute_optimal_token_baseline_advantage",
        options=("handle_zero_tail", "epsilon"), defaults={"epsilon": 1e-8},
        inputs=("old_logprobs", "sum_pi_squared"), optional_inputs=("rollout_is_ratio",)),
    "tir_optimal_token_baseline": Estimator(
        tir_optimal_token_baseline, "optimal_token_baseline over each row's response tokens packed to the left "
                                    "(multi-turn: step t = t-th response token)",
        "compute_multi_turn_optimal_token_baseline_advantage",
        options=("handle_zero_tail", "epsilon"), defaults={"epsilon": 1e-8},
        inputs=("old_logprobs", "sum_pi_squared"), optional_inputs=("rollout_is_ratio",)),
}


# docs/semantics.md's estimator table
# ---------------------------------------------------------------------------------------------

DOCS_BEGIN = "<!-- estimators table: generated by `python -m grpo_kernels.ops.advantages --write-docs` -->"
DOCS_END = "<!-- end of generated estimators table -->"


def estimators_markdown() -> str:
    lines = ["| estimator | advantage | groups | inputs | options (default) | verl 0.9.1 |", "|---|---|---|---|---|---|"]
    for name, spec in ESTIMATORS.items():
        inputs = [f"`{n}`" for n in spec.inputs] + [f"`{n}` (optional)" for n in spec.optional_inputs]
        options = [f"`{n}` ({spec.defaults.get(n, OPTIONS[n].default)!r})" for n in spec.options]
        lines.append(f"| `{name}` | {spec.formula} | {'yes' if spec.grouped else 'no'} | "
                     f"{', '.join(inputs) or '-'} | {', '.join(options) or '-'} | `{spec.verl_function}` |")
    lines += ["", "| option | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {option.meaning} |" for name, option in OPTIONS.items()]
    lines += ["", "| input | shape | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {shape} | {meaning} |" for name, (shape, meaning) in INPUTS.items()]
    return "\n".join(lines)


def docs_in_sync(path, *, write=False) -> bool:
    """Whether ``path`` (docs/semantics.md) holds ``estimators_markdown()`` between the markers;
    with ``write``, make it so."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    begin, end = text.index(DOCS_BEGIN) + len(DOCS_BEGIN), text.index(DOCS_END)
    wanted = text[:begin] + "\n\n" + estimators_markdown() + "\n" + text[end:]
    if write and wanted != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(wanted)
    return wanted == text
