"""``patch_trl()``: TRL 1.16's trainers on grpo-kernels, without changing a line of training code.

It replaces, in every loaded ``trl`` module that holds them (and so in every one loaded later,
which imports them from those):

* ``add_fused_lm_head`` (``trl.trainer.utils``; called by GRPO, RLOO, DPO, KTO, SFT and the
  experimental async GRPO trainer) by :func:`~grpo_kernels.integrations.trl.install_fused_lm_head`;
* ``ChunkedLogProbFunction`` (``trl.kernels``, and ``trl.trainer.utils._ChunkedLogProbFunction``)
  and ``ChunkedDivergenceFunction`` (``trl.kernels.chunked_divergence``, used by
  ``DistillationTrainer``) by the drop-ins of :mod:`~grpo_kernels.integrations.trl.functions`;
* with ``grpo_loss=True`` (default), ``GRPOTrainer._compute_loss`` by the fused GRPO loss
  (:func:`~grpo_kernels.integrations.trl.grpo.grpo_compute_loss`), which computes TRL's own loss
  for what it does not implement.

Each trainer then runs TRL's code everywhere else and logs the same metrics. Calls our kernels do
not implement run TRL's own function, with a one-time ``TRLFallbackWarning``; nothing is refused.

``patch_trl`` is idempotent (a second call with other options re-patches), checks the TRL version
(``ImportError`` outside ``trl>=1.16,<1.17``), and is undone by ``unpatch_trl()``, or scoped by
``with patched_trl(): ...``. Models given our head while patched keep it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys

from grpo_kernels.integrations.trl._compat import check_trl_version, warn_fallback
from grpo_kernels.ops.utils import check_bool

__all__ = ["patch_trl", "unpatch_trl", "patched_trl", "is_trl_patched"]

# The modules that define or import the replaced objects (imported by patch_trl, so that the
# objects are patched wherever TRL's trainers look them up).
TRL_MODULES = (
    "trl.kernels", "trl.kernels.chunked_logprob", "trl.kernels.chunked_divergence", "trl.trainer.utils",
    "trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer", "trl.trainer.dpo_trainer", "trl.trainer.kto_trainer",
    "trl.trainer.sft_trainer", "trl.trainer.distillation_trainer",
)
BACKENDS = ("auto", "triton", "torch")

_state: dict | None = None  # {"options": ..., "replacements": {id(original): (original, replacement)}}


def is_trl_patched() -> bool:
    return _state is not None


def _replacements(backend: str) -> dict:
    from grpo_kernels.integrations.trl import functions, head

    trl_head = head.TRL_ADD_FUSED_LM_HEAD

    @functools.wraps(trl_head)
    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        reason = head.install_fallback_reason(temperature, cast_lm_head_to_fp32, outputs)
        if reason is not None:  # what TRL accepts and install_fused_lm_head refuses: TRL's head
            warn_fallback(f"add_fused_lm_head with {reason}")
            return trl_head(model, temperature, cast_lm_head_to_fp32, outputs)
        head.install_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                                   outputs=outputs, backend=backend)

    logprob = type("ChunkedLogProbFunction", (functions.ChunkedLogProbFunction,), {"backend": backend})
    divergence = type("ChunkedDivergenceFunction", (functions.ChunkedDivergenceFunction,), {"backend": backend})
    pairs = ((trl_head, add_fused_lm_head), (functions.TRL_CHUNKED_LOGPROB, logprob),
             (functions.TRL_CHUNKED_DIVERGENCE, divergence))
    return {id(original): (original, replacement) for original, replacement in pairs}


def _trl_modules():
    return [module for name, module in list(sys.modules.items())
            if module is not None and (name == "trl" or name.startswith("trl."))]


def _swap(mapping: dict) -> None:
    """In every loaded trl module, rebind each attribute whose value is a key of ``mapping``
    (by identity) to its value."""
    for module in _trl_modules():
        for name, value in list(vars(module).items()):
            new = mapping.get(id(value))
            if new is not None and new[0] is value:
                setattr(module, name, new[1])


def patch_trl(*, backend: str = "auto", grpo_loss: bool = True) -> None:
    """Run TRL 1.16's trainers on grpo-kernels (see the module docstring).

    Args:
        backend: what the kernels run on: ``"auto"`` (Triton on CUDA or under
            ``TRITON_INTERPRET=1``, else PyTorch), ``"triton"`` or ``"torch"``.
        grpo_loss: also compute ``GRPOTrainer``'s policy loss with the fused loss kernel.
    """
    global _state
    check_trl_version()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    grpo_loss = check_bool("grpo_loss", grpo_loss)
    options = (backend, grpo_loss)
    if _state is not None:
        if _state["options"] == options:
            return
        unpatch_trl()
    for name in TRL_MODULES:
        importlib.import_module(name)
    replacements = _replacements(backend)
    _swap(replacements)
    from trl import GRPOTrainer

    from grpo_kernels.integrations.trl.grpo import TRL_GRPO_COMPUTE_LOSS, grpo_compute_loss

    if grpo_loss:
        @functools.wraps(TRL_GRPO_COMPUTE_LOSS)
        def _compute_loss(self, model, inputs):
            return grpo_compute_loss(self, model, inputs)

        GRPOTrainer._compute_loss = _compute_loss
    _state = {"options": options, "replacements": replacements}


def unpatch_trl() -> None:
    """Undo :func:`patch_trl` (a no-op when TRL is not patched)."""
    global _state
    if _state is None:
        return
    _swap({id(replacement): (replacement, original) for original, replacement in _state["replacements"].values()})
    from trl import GRPOTrainer

    from grpo_kernels.integrations.trl.grpo import TRL_GRPO_COMPUTE_LOSS

    GRPOTrainer._compute_loss = TRL_GRPO_COMPUTE_LOSS
    _state = None


@contextlib.contextmanager
def patched_trl(*, backend: str = "auto", grpo_loss: bool = True):
    """``with patched_trl(): ...``: :func:`patch_trl` inside the block; on exit TRL is as it was
    (patched with the previous options, or not at all)."""
    previous = None if _state is None else _state["options"]
    patch_trl(backend=backend, grpo_loss=grpo_loss)
    try:
        yield
    finally:
        unpatch_trl()
        if previous is not None:
            patch_trl(backend=previous[0], grpo_loss=previous[1])
