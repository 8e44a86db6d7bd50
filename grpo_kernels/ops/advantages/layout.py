"""Which rows form each group: the one segmentation that every per-group statistic reads.

A :class:`GroupLayout` describes the groups of a batch of ``B`` rows as segments of a row order,
the way ``cu_seqlens`` describes packed sequences: group ``g`` holds rows
``order[offsets[g]:offsets[g + 1]]``. Two constructors:

- :meth:`GroupLayout.contiguous` (``group_size=G``): row ``i`` in group ``i // G``; ``order`` is
  None (the identity), every group has ``G`` rows;
- :meth:`GroupLayout.from_index` (verl's ``index``: a group id per row): groups of any size, in
  any row order; group ``g`` is the ``g``-th smallest id, its rows in increasing row order (a
  stable sort), so that "the first of a group" means the same thing in both layouts.

The kernels take ``offsets`` (and, where they read ``[B, C]`` token tensors, ``order``); the
PyTorch path pads the groups into a dense ``[num_groups, max_group_size, ...]`` view. Packed token
tensors (``cu_seqlens``) are the rows' concern (``tokens.py``); their per-(group, position) sums
run on a layout of the tokens built by :meth:`GroupLayout.from_index` from that key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class GroupLayout:
    """Groups as segments of a row order.

    num_rows: B. offsets: ``[num_groups + 1]`` int64 on the rows' device, ``offsets[0] = 0``,
    ``offsets[-1] = B``. order: ``[B]`` int64, the rows sorted by group, or None when group
    ``g`` is rows ``offsets[g]:offsets[g + 1]``. group_of_row: ``[B]`` int64, the group of each
    row (original row order). max_group_size: the largest group's row count (a host int: it sizes
    the kernels' tiles). group_size: the common size when every group is contiguous with ``G``
    rows, else None.
    """

    num_rows: int
    offsets: torch.Tensor
    order: torch.Tensor | None
    group_of_row: torch.Tensor
    max_group_size: int
    group_size: int | None = None

    @property
    def num_groups(self) -> int:
        return self.offsets.shape[0] - 1

    @classmethod
    def contiguous(cls, num_rows: int, group_size: int, device) -> GroupLayout:
        """``num_rows // group_size`` groups of ``group_size`` consecutive rows."""
        num_groups = num_rows // group_size
        offsets = torch.arange(num_groups + 1, device=device, dtype=torch.int64) * group_size
        group_of_row = torch.arange(num_rows, device=device, dtype=torch.int64) // group_size
        return cls(num_rows, offsets, None, group_of_row, group_size, group_size)

    @classmethod
    def from_index(cls, index: torch.Tensor) -> GroupLayout:
        """Groups of the ids in ``index [B]`` (int32/int64, any values, any order).

        One host sync (the number of groups and the largest group size size the launch).
        """
        ids, group_of_row, counts = torch.unique(index, sorted=True, return_inverse=True, return_counts=True)
        del ids
        group_of_row = group_of_row.to(torch.int64)
        order = torch.sort(group_of_row, stable=True).indices
        offsets = torch.zeros(counts.shape[0] + 1, device=index.device, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        max_group_size = int(counts.max()) if counts.numel() else 0
        return cls(index.shape[0], offsets, order, group_of_row, max_group_size, None)

    def group_sizes(self) -> torch.Tensor:
        """``[num_groups]`` int64: rows per group."""
        return self.offsets[1:] - self.offsets[:-1]

    def _dense_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(group, position in the group) of each row, in ``order``."""
        sorted_groups = self.group_of_row[self.order]
        positions = torch.arange(self.num_rows, device=self.offsets.device) - self.offsets[sorted_groups]
        return sorted_groups, positions

    def to_dense(self, values: torch.Tensor, fill) -> tuple[torch.Tensor, torch.Tensor]:
        """``values [B, ...]`` -> (``[num_groups, max_group_size, ...]``, valid ``[num_groups,
        max_group_size]`` bool): group g's rows in its first ``size_g`` slots, ``fill`` after."""
        rest = tuple(values.shape[1:])
        if self.group_size is not None:
            dense = values.reshape((self.num_groups, self.group_size) + rest)
            return dense, torch.ones(dense.shape[:2], dtype=torch.bool, device=values.device)
        groups, positions = self._dense_positions()
        dense = values.new_full((self.num_groups, self.max_group_size) + rest, fill)
        dense[groups, positions] = values[self.order]
        valid = torch.zeros((self.num_groups, self.max_group_size), dtype=torch.bool, device=values.device)
        valid[groups, positions] = True
        return dense, valid

    def from_dense(self, dense: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_dense`: ``[num_groups, max_group_size, ...]`` -> ``[B, ...]``."""
        if self.group_size is not None:
            return dense.reshape((self.num_rows,) + tuple(dense.shape[2:]))
        groups, positions = self._dense_positions()
        out = dense.new_empty((self.num_rows,) + tuple(dense.shape[2:]))
        out[self.order] = dense[groups, positions]
        return out

    def permute(self, values: torch.Tensor) -> torch.Tensor:
        """Rows in group order (what the kernels read): ``values[order]``."""
        return values if self.order is None else values[self.order]

    def unpermute(self, values: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`permute`."""
        if self.order is None:
            return values
        out = torch.empty_like(values)
        out[self.order] = values
        return out
