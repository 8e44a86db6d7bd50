"""Importing this module runs :func:`grpo_kernels.integrations.verl.patch_verl`: verl's fused
log-prob/entropy functions, its policy losses (``POLICY_LOSS_REGISTRY``) and its advantage
estimators (``ADV_ESTIMATOR_REGISTRY``) on grpo-kernels.

For verl's ``external_lib`` hook, which imports a module in every actor/reference worker process
before the model is built::

    actor_rollout_ref.model.external_lib=grpo_kernels.integrations.verl_autopatch

The advantages are computed in verl's driver process, which that hook does not reach: there,
``VERL_USE_EXTERNAL_MODULES=grpo_kernels.integrations.verl_autopatch`` (verl imports the modules
it names on ``import verl``) or a call to ``patch_verl()``.
"""

from grpo_kernels.integrations.verl import patch_verl

PATCHED = patch_verl()
