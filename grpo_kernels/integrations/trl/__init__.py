"""TRL 1.16 on grpo-kernels: the fused LM head, the chunked log-prob and divergence functions, the
GRPO loss, for every trainer that uses them (GRPO, RLOO, DPO, KTO, SFT, distillation, and the
experimental ones built on them).

Two ways in:

* ``patch_trl()`` (undo: ``unpatch_trl()``, or ``with patched_trl(): ...``): TRL's own trainers,
  unchanged training code, on our kernels (:mod:`.patch`).
* Explicitly: ``install_fused_lm_head(model, temperature=..., outputs=...)`` (TRL's
  ``add_fused_lm_head`` convention, :mod:`.head`), the drop-in ``ChunkedLogProbFunction`` and
  ``ChunkedDivergenceFunction`` (:mod:`.functions`), and ``FusedGRPOTrainer`` (:mod:`.grpo`).

What our kernels do not implement runs TRL's own code for that call, with a one-time
``TRLFallbackWarning``: nothing TRL runs is refused, and no number differs from TRL's.
Needs ``trl>=1.16,<1.17`` (``pip install 'grpo-kernels[trl]'``).
"""

from grpo_kernels.integrations.trl._compat import SUPPORTED_TRL_VERSIONS, TRLFallbackWarning, check_trl_version
from grpo_kernels.integrations.trl.functions import ChunkedDivergenceFunction, ChunkedLogProbFunction
from grpo_kernels.integrations.trl.grpo import FusedGRPOTrainer, fused_loss_fallback_reason
from grpo_kernels.integrations.trl.head import FUSED_OUTPUTS, install_fused_lm_head
from grpo_kernels.integrations.trl.patch import is_trl_patched, patch_trl, patched_trl, unpatch_trl

__all__ = [
    "patch_trl",
    "unpatch_trl",
    "patched_trl",
    "is_trl_patched",
    "install_fused_lm_head",
    "FUSED_OUTPUTS",
    "ChunkedLogProbFunction",
    "ChunkedDivergenceFunction",
    "FusedGRPOTrainer",
    "fused_loss_fallback_reason",
    "TRLFallbackWarning",
    "SUPPORTED_TRL_VERSIONS",
    "check_trl_version",
]
