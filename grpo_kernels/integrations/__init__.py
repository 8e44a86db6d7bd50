"""Drop-in integrations with RL trainers (imported explicitly, so that neither is a dependency).

* ``grpo_kernels.integrations.trl``: ``patch_trl()``, TRL 1.16's GRPO, RLOO, DPO, KTO, SFT and
  distillation trainers on grpo-kernels' head, divergence and GRPO loss; ``install_fused_lm_head``,
  drop-in ``ChunkedLogProbFunction`` / ``ChunkedDivergenceFunction``, ``FusedGRPOTrainer``
  (``pip install 'grpo-kernels[trl]'``, trl>=1.16,<1.17).
* ``grpo_kernels.integrations.verl``: verl's fused log-prob/entropy functions
  (``linear_cross_entropy``, ``FusedLinearForPPO``) and policy losses (``policy_loss(name)``) on
  grpo-kernels, and ``patch_verl()``;
  ``grpo_kernels.integrations.verl_autopatch`` patches on import (verl's ``external_lib`` hook).
"""
