"""Which tokens form each row: the token layout the token-level estimators read.

``PaddedTokens``: ``[B, T]`` token tensors, row ``i`` in row ``i`` (the reductions are the ``dim=-1``
operations verl writes). ``PackedTokens``: ``[N]`` token tensors cut into S rows (sequences) by
``cu_seqlens`` (``ops/packing.py``), reduced per segment without materializing the padding; the
padded ``[S, T]`` layout of the same data (zeros where a packed batch has no token) gives the same
results. The estimators (``estimators.py``) are written once against this interface:

- ``sum(v)`` ``[R]``: each row's sum; ``spread(per_row)``: a per-row value on each of its tokens;
- ``cumsum(v)`` / ``reverse_cumsum(v)``: running sums along each row, from its start / its end;
- ``following(v)``: the value at the next position of the row (0 after its last);
- ``positions()``: each token's position in its row; ``horizon``: the longest row (a host int);
- ``row_start(flat)``: the flat index of the first position of each flat token index's row;
- ``group_position_sums(v, groups, backend)``: ``[num_groups, horizon, C]``, the sums over a
  group's rows at each position (the group kernel's ``segment_sum``, rows in row order);
- ``at_positions(table)``: ``table [num_groups_or_rows, horizon]`` read at each token's (row's
  group, position).
"""

from __future__ import annotations

import torch

from grpo_kernels.ops.advantages.group import segment_sum
from grpo_kernels.ops.advantages.layout import GroupLayout
from grpo_kernels.ops.packing import sequence_lengths, sequence_of_token


class PaddedTokens:
    """``[B, T]`` token tensors."""

    packed = False

    def __init__(self, shape, device):
        self.num_rows, self.horizon = shape
        self.token_shape = tuple(shape)
        self.device = device

    def sum(self, values):
        return values.sum(dim=-1)

    def spread(self, per_row):
        return per_row[:, None]

    def cumsum(self, values):
        return values.cumsum(dim=-1)

    def reverse_cumsum(self, values):
        return values.flip(-1).cumsum(-1).flip(-1)

    def following(self, values):
        return torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)

    def positions(self):
        return torch.arange(self.horizon, device=self.device)[None, :]

    def row_start(self, flat):
        return flat - flat % self.horizon

    def group_position_sums(self, values, groups: GroupLayout, backend):
        """``values`` list of ``[B, T]`` -> ``[num_groups, T, C]``."""
        sums = segment_sum(torch.cat(values, dim=1), groups, backend=backend)
        return sums.reshape(groups.num_groups, len(values), self.horizon).transpose(1, 2)

    def at_positions(self, table, row_group):
        return table[row_group]


class PackedTokens:
    """``[N]`` token tensors, rows cut by ``cu_seqlens`` (int64 ``[S + 1]``, values checked)."""

    packed = True

    def __init__(self, cu_seqlens, num_tokens):
        self.cu_seqlens = cu_seqlens
        self.num_rows = cu_seqlens.shape[0] - 1
        self.token_shape = (num_tokens,)
        self.row_of_token = sequence_of_token(cu_seqlens, num_tokens)
        self.lengths = sequence_lengths(cu_seqlens)
        self._horizon = None

    @property
    def horizon(self) -> int:
        """The longest row (one host sync, the first time)."""
        if self._horizon is None:
            self._horizon = int(self.lengths.max())
        return self._horizon

    def sum(self, values):
        return torch.segment_reduce(values, "sum", offsets=self.cu_seqlens)

    def spread(self, per_row):
        return per_row[self.row_of_token]

    def cumsum(self, values):
        """Each row's running sum: the prefix sums of the token dimension less those before the row
        (float64: the cancellation costs ~1e-16 of the prefix)."""
        prefix = torch.cat([values.new_zeros(1), values.cumsum(0)])
        return prefix[1:] - prefix[self.cu_seqlens[:-1]][self.row_of_token]

    def reverse_cumsum(self, values):
        prefix = torch.cat([values.new_zeros(1), values.cumsum(0)])
        return prefix[self.cu_seqlens[1:]][self.row_of_token] - prefix[:-1]

    def following(self, values):
        shifted = torch.cat([values[1:], values.new_zeros(1)])
        last = torch.arange(values.shape[0], device=values.device) + 1 == self.cu_seqlens[1:][self.row_of_token]
        return torch.where(last, torch.zeros_like(shifted), shifted)

    def positions(self):
        return torch.arange(self.token_shape[0], device=self.cu_seqlens.device) - self.cu_seqlens[:-1][self.row_of_token]

    def row_start(self, flat):
        return self.cu_seqlens[:-1][self.row_of_token[flat]]

    def group_position_sums(self, values, groups: GroupLayout, backend):
        """``values`` list of ``[N]`` -> ``[num_groups, horizon, C]``: the tokens of one (group,
        position) summed in token order (its rows' order), on the group kernel's segment sum."""
        horizon = self.horizon
        key = groups.group_of_row[self.row_of_token] * horizon + self.positions()
        by_key = GroupLayout.from_index(key)  # one sort of the token keys (and a host sync)
        sums = segment_sum(torch.stack(values, dim=1), by_key, backend=backend)
        dense = sums.new_zeros(groups.num_groups * horizon, len(values))
        dense[torch.unique(key)] = sums
        return dense.reshape(groups.num_groups, horizon, len(values))

    def at_positions(self, table, row_group):
        return table[row_group[self.row_of_token], self.positions()]
