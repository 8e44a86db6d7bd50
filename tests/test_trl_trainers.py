"""TRL 1.16's trainer tests (GRPO, GMPO, RLOO, DPO, KTO, SFT, distillation), adapted offline, with
the patch on: each trains a tiny model built from a config, on TRL as it is and under
``patched_trl()``, from the same seed, and checks

* TRL's own assertions on both runs (the training loss is logged, every trainable parameter
  moved; the trainer's metrics are logged);
* that the patched run never reached TRL's chunked functions (``trl_tiny.run_pair``);
* that the logged loss, grad norm and every metric agree step by step within 1e-5 relative
  (values that are 0 up to rounding within 1e-7), in float32.

Adaptations: Hub models and datasets are replaced by ``trl_tiny``'s (a Qwen2 with hidden 32,
2 layers, a 97-id vocabulary); reward models by reward functions; two logged steps.
"""

import warnings
from unittest import mock

import pytest
from trl import (
    DistillationConfig,
    DistillationTrainer,
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)

import trl_tiny as tiny
from trl_tiny import one_thread  # noqa: F401
from grpo_kernels.integrations.trl import TRLFallbackWarning, _compat
from grpo_kernels.integrations.trl import grpo as fused_grpo

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny.save_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return tiny.save_model(tmp_path_factory.mktemp("tiny-qwen2-teacher"), seed=1, hidden_size=48)


@pytest.fixture(autouse=True)
def fresh_fallback_warnings():
    _compat._WARNED.clear()  # each test sees its own one-time warnings
    yield


def check_pair(make_trainer, frozen=(), **run_kwargs):
    reference, patched, before = tiny.run_pair(make_trainer, **run_kwargs)
    for trainer in (reference, patched):
        tiny.assert_trained(trainer, before, frozen=frozen)
    tiny.assert_same_logs(reference, patched)
    return reference, patched


# ---------------------------------------------------------------------------------------------
# GRPO (TRL's test_grpo_trainer.py: test_training[loss_type], test_training_beta_non_zero,
# test_training_with_entropy_filter, test_training_multiple_iterations) and GMPO
# ---------------------------------------------------------------------------------------------

GRPO_CASES = {
    # the fused loss: dapo, a reference model (beta), old log-probs recomputed (num_iterations)
    "dapo-beta-iterations": dict(beta=0.04, num_iterations=2),
    # the fused loss: entropy masking and an entropy bonus, grpo's per-sequence normalization
    "grpo-entropy-filter": dict(loss_type="grpo", top_entropy_quantile=0.5, entropy_coef=0.01),
    # TRL's loss on our head (FusedGRPOTrainer refused these before)
    "cispo-sequence": dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=1.2,
                           num_iterations=2, fallback=True),
    "sapo-sequence": dict(loss_type="sapo", importance_sampling_level="sequence", num_iterations=2, fallback=True),
    "vespo-sequence": dict(loss_type="vespo", importance_sampling_level="sequence", num_iterations=2, fallback=True),
    # patch_trl(grpo_loss=False): our head, TRL's loss
    "bnpo-trl-loss": dict(loss_type="bnpo", beta=0.04, grpo_loss=False),
    # the Triton kernels (under the interpreter on CPU), fused loss
    "grpo-triton": dict(loss_type="grpo", beta=0.04, backend="triton"),
}


def grpo_trainer(trainer_cls, config_cls, path, tmp_path, **overrides):
    def make(tag):
        args = config_cls(**tiny.common_args(tmp_path / tag, per_device_train_batch_size=4, num_generations=4,
                                             max_completion_length=6, **overrides))
        return trainer_cls(model=path, reward_funcs=[tiny.reward_count, tiny.reward_short], args=args,
                           train_dataset=tiny.prompt_dataset(), processing_class=tiny.make_tokenizer())

    return make


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_training(case, model_path, tmp_path):
    overrides = dict(GRPO_CASES[case])
    fallback = overrides.pop("fallback", False)
    run_kwargs = dict(backend=overrides.pop("backend", "torch"), grpo_loss=overrides.pop("grpo_loss", True))
    make = grpo_trainer(GRPOTrainer, GRPOConfig, model_path, tmp_path, **overrides)
    with mock.patch.object(fused_grpo, "_fused_compute_loss", wraps=fused_grpo._fused_compute_loss) as fused, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TRLFallbackWarning)
        reference, patched = check_pair(make, **run_kwargs)
    fell_back = [w for w in caught if issubclass(w.category, TRLFallbackWarning)]
    uses_fused = run_kwargs["grpo_loss"] and not fallback
    assert (fused.call_count > 0) == uses_fused
    assert bool(fell_back) == (run_kwargs["grpo_loss"] and fallback)
    if fallback:
        assert "TRL's loss on grpo-kernels' LM head" in str(fell_back[0].message)
    metrics = tiny.step_logs(reference)[-1]
    assert "entropy" in metrics and ("kl" in metrics) == (overrides.get("beta", 0.0) != 0.0)


def test_gmpo_training(model_path, tmp_path):
    """TRL's experimental GMPO trainer (geometric-mean ratios) keeps its own loss, on our head."""
    from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

    make = grpo_trainer(GMPOTrainer, GMPOConfig, model_path, tmp_path, num_iterations=2, beta=0.04)
    reference, _ = check_pair(make)
    assert "clip_ratio/region_mean" in tiny.step_logs(reference)[-1]


# ---------------------------------------------------------------------------------------------
# RLOO (TRL's test_rloo_trainer.py: test_train, test_train_multiple_iterations)
# ---------------------------------------------------------------------------------------------


def test_rloo_training(model_path, tmp_path):
    def make(tag):
        args = RLOOConfig(**tiny.common_args(tmp_path / tag, per_device_train_batch_size=4, num_generations=4,
                                             max_completion_length=6, num_iterations=2, beta=0.04))
        return RLOOTrainer(model=model_path, reward_funcs=[tiny.reward_count, tiny.reward_short], args=args,
                           train_dataset=tiny.prompt_dataset(), processing_class=tiny.make_tokenizer())

    reference, _ = check_pair(make)
    assert {"entropy", "clip_ratio/region_mean"} <= set(tiny.step_logs(reference)[-1])


# ---------------------------------------------------------------------------------------------
# DPO, KTO (TRL's test_dpo_trainer.py / test_kto_trainer.py: test_train)
# ---------------------------------------------------------------------------------------------


def test_dpo_training(model_path, tmp_path):
    """DPO with WPO weights (``use_weighting``: the head's log sum p^2) and its logits and
    accuracy metrics (mean logit, is_top1)."""
    def make(tag):
        args = DPOConfig(**tiny.common_args(tmp_path / tag, per_device_train_batch_size=3, use_weighting=True))
        return DPOTrainer(model=model_path, args=args, train_dataset=tiny.preference_dataset(),
                          processing_class=tiny.make_tokenizer())

    reference, _ = check_pair(make)
    assert {"logits/chosen", "mean_token_accuracy", "rewards/margins", "entropy"} <= set(tiny.step_logs(reference)[-1])


def test_kto_training(model_path, tmp_path):
    def make(tag):
        args = KTOConfig(**tiny.common_args(tmp_path / tag, per_device_train_batch_size=4))
        return KTOTrainer(model=model_path, args=args, train_dataset=tiny.unpaired_preference_dataset(),
                          processing_class=tiny.make_tokenizer())

    reference, _ = check_pair(make)
    assert {"kl", "logits/chosen", "entropy"} <= set(tiny.step_logs(reference)[-1])


# ---------------------------------------------------------------------------------------------
# SFT (TRL's test_sft_trainer.py: test_train, test_train_dft_loss)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_training(loss_type, model_path, tmp_path):
    def make(tag):
        args = SFTConfig(**tiny.common_args(tmp_path / tag, per_device_train_batch_size=4, loss_type=loss_type))
        return SFTTrainer(model=model_path, args=args, train_dataset=tiny.language_modeling_dataset(),
                          processing_class=tiny.make_tokenizer())

    reference, _ = check_pair(make)
    assert {"entropy", "mean_token_accuracy"} <= set(tiny.step_logs(reference)[-1])


# ---------------------------------------------------------------------------------------------
# Distillation (TRL's test_distillation_trainer.py: test_train), forward KL, JSD, reverse KL
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_training(beta, model_path, teacher_path, tmp_path):
    """A wider teacher (hidden 48) than the student (hidden 32): only the vocabulary is shared."""
    def make(tag):
        args = DistillationConfig(**tiny.common_args(tmp_path / tag, per_device_train_batch_size=3,
                                                     max_completion_length=6, beta=beta, temperature=0.9))
        return DistillationTrainer(model=model_path, teacher_model=teacher_path, args=args,
                                   train_dataset=tiny.prompt_dataset(), processing_class=tiny.make_tokenizer())

    reference, _ = check_pair(make)
    assert "entropy" in tiny.step_logs(reference)[-1]
