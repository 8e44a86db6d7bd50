"""Advantages: group-relative advantages (TRL's GRPO family, GDPO, GFPO) and verl's estimators.

One concept per module:

- ``layout.py``: which rows form each group (``group_size`` or verl's ``index``), as segments;
- ``tokens.py``: which tokens form each row: padded ``[B, T]`` or packed ``[N]`` with ``cu_seqlens``;
- ``kernels.py``: the Triton kernels (group statistics and advantages; per-group row sums) and
  their sm_90 compile specs;
- ``torch_path.py``: their PyTorch twins (CPU without the interpreter);
- ``group.py``: :func:`group_advantages`, :func:`gfpo_keep_mask` (TRL semantics);
- ``estimators.py``: verl 0.9.1's advantage estimators, one table of small functions;
- ``estimate.py``: :func:`estimate_advantages`, their checked entry point.

``python -m grpo_kernels.ops.advantages --write-docs`` regenerates docs/semantics.md's estimator
table.
"""

from grpo_kernels.ops.advantages.estimate import TokenAdvantages, estimate_advantages, validate_estimator_options
from grpo_kernels.ops.advantages.estimators import ESTIMATORS
from grpo_kernels.ops.advantages.group import (
    MAX_WEIGHTED_REWARD,
    MULTI_OBJECTIVE_AGGREGATIONS,
    REWARD_DTYPES,
    SCALES,
    ZERO_STD_ATOL,
    GroupAdvantages,
    gfpo_keep_mask,
    group_advantages,
)
from grpo_kernels.ops.advantages.kernels import sm90_compile_specs
from grpo_kernels.ops.advantages.layout import GroupLayout

__all__ = [
    "ESTIMATORS",
    "GroupAdvantages",
    "GroupLayout",
    "MAX_WEIGHTED_REWARD",
    "MULTI_OBJECTIVE_AGGREGATIONS",
    "REWARD_DTYPES",
    "SCALES",
    "TokenAdvantages",
    "ZERO_STD_ATOL",
    "estimate_advantages",
    "gfpo_keep_mask",
    "group_advantages",
    "sm90_compile_specs",
    "validate_estimator_options",
]
