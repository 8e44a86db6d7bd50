"""Packed sequences (``cu_seqlens``) in ``estimate_advantages``: every estimator of verl's registry on
a packed ``[N]`` (or ``[1, N]``) batch gives the advantages and returns of its padded ``[S, T]``
layout (float64: 1e-10; float32 outputs: <= 1e-6 relative) and of the float64 reference, on both
CPU paths, with verl's ``index`` (uneven, interleaved, one-row groups) or ``group_size``; the pack
holds an empty sequence, a tool-output hole and rows of several lengths (test_advantage_estimators'
batch, its padding dropped)."""

import pytest
import torch

from grpo_kernels.ops.advantages import ESTIMATORS, estimate_advantages
from grpo_kernels.reference import advantage_estimator_reference
from test_advantage_estimators import CASES, INDEX, PASSK_INDEX, UNGROUPED, backend, make_batch, our_call  # noqa: F401

LENGTHS = [13, 7, 9, 0, 5, 11, 8, 13, 6, 3, 8, 7, 12, 4, 2]  # make_batch's rows (row 3 is empty)
TOKEN_INPUTS = ("old_logprobs", "sum_pi_squared", "rollout_is_ratio")


def pack(data, lengths=LENGTHS, cu_dtype=torch.int64):
    """The packed layout of make_batch's padded data: row i's first lengths[i] positions (the rest
    is padding: zero rewards, zero mask)."""
    lengths_t = torch.tensor(lengths)
    keep = torch.arange(data["rewards"].shape[1])[None, :] < lengths_t[:, None]
    assert not data["mask"][~keep].any() and not data["rewards"][~keep].any()
    packed = {k: (v[keep] if k in ("rewards", "mask") + TOKEN_INPUTS else v) for k, v in data.items()}
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = lengths_t.cumsum(0)
    return packed, cu.to(cu_dtype), keep


def run_both(name, options, dtype=torch.float64, one_row=False, cu_dtype=torch.int64, grouping="index"):
    data = make_batch("cpu", dtype, index=PASSK_INDEX if name == "grpo_passk" else INDEX)
    packed, cu, keep = pack(data, cu_dtype=cu_dtype)
    kwargs = our_call(name, data, dict(options))
    if grouping == "group_size" and "index" in kwargs:
        kwargs["group_size"] = 5 if name != "grpo_passk" else 3
        del kwargs["index"]
    packed_kwargs = {k: (packed[k] if k in TOKEN_INPUTS else v) for k, v in kwargs.items()}
    rewards, mask = packed["rewards"], packed["mask"]
    if one_row:
        rewards, mask = rewards[None], mask[None]
        packed_kwargs = {k: (v[None] if k in TOKEN_INPUTS else v) for k, v in packed_kwargs.items()}
    got = estimate_advantages(name, rewards, mask, cu_seqlens=cu, **packed_kwargs)
    want = estimate_advantages(name, data["rewards"], data["mask"], **kwargs)
    return got, want, keep, data, kwargs


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
def test_packed_equals_padded_and_reference(backend, name, options):
    got, want, keep, data, kwargs = run_both(name, options)
    assert got.advantages.shape == (sum(LENGTHS),) and got.advantages.dtype == torch.float64
    for field in ("advantages", "returns"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field)[keep], rtol=1e-10, atol=1e-12)
        assert not getattr(want, field)[~keep].any()  # the padded layout has nothing where the pack has no token
    reference_kwargs = {k: v for k, v in kwargs.items() if k != "index"}
    oracle = advantage_estimator_reference(name, data["rewards"], data["mask"],
                                           None if name in UNGROUPED else kwargs["index"], **reference_kwargs)
    torch.testing.assert_close(got.advantages, oracle[0][keep], rtol=1e-9, atol=1e-10)
    assert got.advantages.abs().sum() > 0


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_float32_one_row_layout_int32_group_size(backend, name):
    """float32 rewards, [1, N] token tensors (verl's remove-padding layout), int32 cu_seqlens,
    contiguous groups: within 1e-6 of the padded layout."""
    got, want, keep, _, _ = run_both(name, {}, dtype=torch.float32, one_row=True, cu_dtype=torch.int32,
                                     grouping="group_size")
    assert got.advantages.shape == (1, sum(LENGTHS)) and got.advantages.dtype == torch.float32
    for field in ("advantages", "returns"):
        a, b = getattr(got, field)[0].double(), getattr(want, field)[keep].double()
        assert float(((a - b).abs() / b.abs().clamp(min=1.0)).max()) <= 1e-6, field


def test_returns_stay_in_their_sequence():
    """A packed row's return-to-go stops at its own end: moving reward into the next sequence
    changes that sequence's returns only (REINFORCE++ with a discount)."""
    data = make_batch("cpu", torch.float64)
    packed, cu, _ = pack(data)
    base = estimate_advantages("reinforce_plus_plus", packed["rewards"], packed["mask"], cu_seqlens=cu, gamma=0.9)
    moved = packed["rewards"].clone()
    moved[cu[5]] += 3.0  # the first token of sequence 5
    after = estimate_advantages("reinforce_plus_plus", moved, packed["mask"], cu_seqlens=cu, gamma=0.9)
    changed = (base.returns != after.returns).nonzero().squeeze(1)
    assert len(changed) > 0 and bool(((changed >= cu[5]) & (changed < cu[6])).all())


BAD = [
    (dict(short_last=True), ValueError, r"cu_seqlens\[-1\] must equal the number of tokens, 108"),
    (dict(cu_seqlens=torch.tensor([0.0, 108.0])), TypeError, "cu_seqlens must have dtype"),
    (dict(shift_first=True), ValueError, r"cu_seqlens\[0\] must be 0"),
    (dict(rewards_2d=True), ValueError, r"token_level_rewards must be \[N\] or \[1, N\]"),
    (dict(index=torch.arange(108)), ValueError, r"index must have shape \[B\]=\[15\]"),
    (dict(old_logprobs=torch.zeros(107)), ValueError, "old_logprobs must have N = 108"),
]


@pytest.mark.parametrize("changes,error,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_packed_input(changes, error, match):
    data = make_batch("cpu", torch.float64)
    packed, cu, _ = pack(data)
    assert sum(LENGTHS) == 108
    kwargs = dict(cu_seqlens=cu, index=data["index"], old_logprobs=packed["old_logprobs"],
                  sum_pi_squared=packed["sum_pi_squared"])
    rewards = packed["rewards"]
    if changes.pop("short_last", False):
        kwargs["cu_seqlens"] = torch.cat([cu[:-1], cu[-1:] - 1])
    if changes.pop("shift_first", False):
        kwargs["cu_seqlens"] = torch.cat([cu[:1] + 1, cu[1:]])
    if changes.pop("rewards_2d", False):
        rewards = rewards.reshape(2, 54)
    kwargs.update(changes)
    with pytest.raises(error, match=match):
        estimate_advantages("optimal_token_baseline", rewards, packed["mask"], **kwargs)
