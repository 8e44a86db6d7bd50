"""GRPO-family policy loss from per-token log-probs: loss, metrics and d loss / d logp in one pass.

For a batch of B completions of T tokens (``logprobs``, ``completion_mask`` ``[B, T]``) and one
advantage per completion (or per token), the loss is the per-token loss ``L_t`` of the chosen loss
type, aggregated by its normalizer (``docs/semantics.md`` states every formula)::

    l_t   = logp_t - old_t                                   (old = logp.detach() when not given)
    rho   = exp(l_t)  token level,  exp(sum_t m l_t / max(sum_t m, 1))  sequence level (GSPO)
    L_t   = P_t(rho, A, logp) * multiplier_t + beta * KL_t (* rho when bias-corrected)
    loss  = aggregation(L) - entropy_coef * (mean entropy over the effective mask)

``P_t`` is the loss type's policy term, ``multiplier_t`` the entropy mask x rollout IS ratio x
off-policy mask, ``KL_t`` the chosen KL estimator. With ``cu_seqlens`` the rows are packed
sequences of ``[N]`` token tensors: the padded layout's results without its padding
(docs/semantics.md, "Packed sequences"; the row passes address them, ``api.LossLayout`` checks them).

One module per concept:

* ``terms``: the per-token formulas, one small ``@triton.jit`` function per policy term and KL
  estimator (run by the kernel and, on torch tensors, by the torch row pass);
* ``table``: the family as tables (``POLICIES``, ``LOSS_TYPES_TABLE``, ``AGGREGATIONS``,
  ``KL_ESTIMATORS``, metrics, the row statistics' columns);
* ``options``: the ``OPTIONS`` table, ``validate_loss_options`` and the generated docs tables;
* ``kernel``: the Triton row pass and its launch; ``rows_torch``: the same row pass on torch;
* ``covariance``: KL-Cov / Clip-Cov's token selection;
* ``op``: the custom op ``grpo_kernels::grpo_loss`` and its autograd formula;
* ``api``: ``grpo_loss``, ``prepare_loss_inputs``, ``grpo_loss_prepared``, ``rollout_correction``;
* ``specs``: every kernel configuration, for the sm_90 compile check.

``grpo_kernels.reference`` is the independent float64 autograd oracle. Adding a loss type: one
jit function in ``terms``, one ``PolicyTerm`` and one ``LossType`` entry in ``table`` (and any new
option in ``options.OPTIONS``); see CONTRIBUTING.md.
"""

from grpo_kernels.ops.grpo_loss.api import (
    check_temperature,
    grpo_loss,
    grpo_loss_prepared,
    prepare_loss_inputs,
    rollout_correction,
)
from grpo_kernels.ops.grpo_loss.options import (
    DOCS_BEGIN,
    DOCS_END,
    IMPORTANCE_SAMPLING_LEVELS,
    OPTIONS,
    ROLLOUT_IS_MODES,
    LossConfig,
    Option,
    docs_in_sync,
    options_markdown,
    validate_loss_options,
)
from grpo_kernels.ops.grpo_loss.specs import sm90_compile_specs
from grpo_kernels.ops.grpo_loss.table import (
    AGGREGATIONS,
    CLIP_LOSS_TYPES,
    COMMON_METRICS,
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    LOSS_TYPES,
    LOSS_TYPES_TABLE,
    METRIC_DOCS,
    METRIC_NAMES,
    NUM_STATS,
    POLICIES,
    REJECTION_SAMPLING,
    STAT_COLUMNS,
    Aggregation,
    LossType,
    PolicyTerm,
    metric_names,
)

__all__ = [
    "grpo_loss", "grpo_loss_prepared", "prepare_loss_inputs", "check_temperature", "rollout_correction",
    "validate_loss_options",
    "LossConfig", "Option", "OPTIONS", "IMPORTANCE_SAMPLING_LEVELS", "ROLLOUT_IS_MODES", "options_markdown",
    "docs_in_sync", "DOCS_BEGIN", "DOCS_END", "sm90_compile_specs", "AGGREGATIONS", "CLIP_LOSS_TYPES",
    "COMMON_METRICS", "KL_ESTIMATORS", "LOSS_AGG_MODES", "LOSS_TYPES", "LOSS_TYPES_TABLE", "METRIC_DOCS",
    "METRIC_NAMES", "NUM_STATS", "POLICIES", "REJECTION_SAMPLING", "STAT_COLUMNS", "Aggregation", "LossType", "PolicyTerm",
    "metric_names",
]
