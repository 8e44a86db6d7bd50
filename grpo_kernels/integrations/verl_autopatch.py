"""Importing this module runs :func:`grpo_kernels.integrations.verl.patch_verl`: verl's fused
log-prob/entropy functions and its policy losses (``POLICY_LOSS_REGISTRY``) on grpo-kernels.

For verl's ``external_lib`` hook, which imports a module in every actor/reference worker process
before the model is built::

    actor_rollout_ref.model.external_lib=grpo_kernels.integrations.verl_autopatch
"""

from grpo_kernels.integrations.verl import patch_verl

PATCHED = patch_verl()
