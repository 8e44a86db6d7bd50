"""``patch_trl``: what it replaces, idempotence, undoing, the version check, the one-time fallback
to TRL's own code (never a refusal, never a different number), and ``install_fused_lm_head`` on
what TRL's trainers give it (bad arguments, an all-ignored micro-batch, a vision-language model).
"""

import copy
import sys
import types
import warnings

import pytest
import torch
import trl
import trl.kernels
import trl.kernels.chunked_divergence
import trl.kernels.chunked_logprob
import trl.trainer.distillation_trainer
import trl.trainer.grpo_trainer
import trl.trainer.utils
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

import trl_tiny as tiny
from grpo_kernels.integrations.trl import (
    TRLFallbackWarning,
    _compat,
    functions,
    install_fused_lm_head,
    is_trl_patched,
    patch_trl,
    patched_trl,
    unpatch_trl,
)
from grpo_kernels.integrations.trl import head as fused_head
from trl_tiny import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TRL_HEAD = add_fused_lm_head
TRL_LOGPROB = trl.kernels.chunked_logprob.ChunkedLogProbFunction
TRL_DIVERGENCE = trl.kernels.chunked_divergence.ChunkedDivergenceFunction
TRL_LOSS = GRPOTrainer._compute_loss
TRAINER_MODULES = ("grpo_trainer", "rloo_trainer", "dpo_trainer", "kto_trainer", "sft_trainer")


def published():
    """Every place TRL's trainers look the replaced objects up."""
    import importlib

    places = {"utils.add_fused_lm_head": trl.trainer.utils.add_fused_lm_head,
              "utils._ChunkedLogProbFunction": trl.trainer.utils._ChunkedLogProbFunction,
              "kernels.ChunkedLogProbFunction": trl.kernels.ChunkedLogProbFunction,
              "chunked_logprob.ChunkedLogProbFunction": trl.kernels.chunked_logprob.ChunkedLogProbFunction,
              "chunked_divergence.ChunkedDivergenceFunction": trl.kernels.chunked_divergence.ChunkedDivergenceFunction,
              "distillation.ChunkedDivergenceFunction": trl.trainer.distillation_trainer.ChunkedDivergenceFunction,
              "GRPOTrainer._compute_loss": GRPOTrainer._compute_loss}
    for name in TRAINER_MODULES:
        places[f"{name}.add_fused_lm_head"] = importlib.import_module(f"trl.trainer.{name}").add_fused_lm_head
    return places


ORIGINALS = {"utils.add_fused_lm_head": TRL_HEAD, "utils._ChunkedLogProbFunction": TRL_LOGPROB,
             "kernels.ChunkedLogProbFunction": TRL_LOGPROB, "chunked_logprob.ChunkedLogProbFunction": TRL_LOGPROB,
             "chunked_divergence.ChunkedDivergenceFunction": TRL_DIVERGENCE,
             "distillation.ChunkedDivergenceFunction": TRL_DIVERGENCE, "GRPOTrainer._compute_loss": TRL_LOSS,
             **{f"{name}.add_fused_lm_head": TRL_HEAD for name in TRAINER_MODULES}}


@pytest.fixture(autouse=True)
def unpatched():
    unpatch_trl()
    _compat._WARNED.clear()
    yield
    unpatch_trl()


def test_patch_replaces_everything_idempotently_and_unpatch_restores():
    assert published() == ORIGINALS and not is_trl_patched()
    patch_trl(backend="torch")
    first = published()
    assert all(first[name] is not ORIGINALS[name] for name in ORIGINALS)
    assert first["kernels.ChunkedLogProbFunction"].backend == "torch"
    assert first["utils._ChunkedLogProbFunction"] is first["kernels.ChunkedLogProbFunction"]
    assert first["grpo_trainer.add_fused_lm_head"] is first["utils.add_fused_lm_head"]
    patch_trl(backend="torch")  # idempotent: the same objects, no wrapping twice
    assert published() == first
    patch_trl(backend="triton")  # other options: re-patched
    assert published()["kernels.ChunkedLogProbFunction"].backend == "triton"
    unpatch_trl()
    assert published() == ORIGINALS and not is_trl_patched()
    unpatch_trl()  # a no-op
    assert published() == ORIGINALS


def test_grpo_loss_false_keeps_trl_loss():
    patch_trl(grpo_loss=False)
    assert GRPOTrainer._compute_loss is TRL_LOSS
    assert trl.trainer.grpo_trainer.add_fused_lm_head is not TRL_HEAD


def test_patched_trl_restores_the_previous_state():
    with patched_trl(backend="torch"):
        assert is_trl_patched()
        with patched_trl(backend="triton"):
            assert trl.kernels.ChunkedLogProbFunction.backend == "triton"
        assert trl.kernels.ChunkedLogProbFunction.backend == "torch"
    assert published() == ORIGINALS
    with pytest.raises(RuntimeError, match="boom"):
        with patched_trl():
            raise RuntimeError("boom")
    assert published() == ORIGINALS


def test_modules_loaded_while_patched_are_restored(monkeypatch):
    # A trl module imported while patched holds the replacement (it imported it from trl.trainer.utils).
    patch_trl()
    late = types.ModuleType("trl._late_module")
    late.add_fused_lm_head = trl.trainer.utils.add_fused_lm_head
    late.alias = trl.kernels.ChunkedLogProbFunction
    monkeypatch.setitem(sys.modules, "trl._late_module", late)
    unpatch_trl()
    assert late.add_fused_lm_head is TRL_HEAD and late.alias is TRL_LOGPROB


@pytest.mark.parametrize("version", ["1.17.0", "1.15.2", "2.0.0"])
def test_version_check(version, monkeypatch):
    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(ImportError, match=r"trl>=1.16,<1.17.*found trl " + version.replace(".", r"\.")):
        patch_trl()
    assert published() == ORIGINALS


def test_bad_options():
    with pytest.raises(ValueError, match="backend"):
        patch_trl(backend="cuda")
    with pytest.raises(TypeError, match="grpo_loss must be a bool"):
        patch_trl(grpo_loss="yes")
    assert not is_trl_patched()


# ---------------------------------------------------------------------------------------------
# Fallbacks: TRL's own code, one warning per reason, TRL's numbers
# ---------------------------------------------------------------------------------------------


def collect_fallbacks(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, TRLFallbackWarning)]


@pytest.mark.parametrize("logit_scale", [0.0, -0.5])
def test_non_positive_logit_scale_runs_trl_head(logit_scale):
    """TRL keeps a 0 (or negative) logit scale as it is; our kernels fold the scale into a positive
    temperature, so such a model's head calls run TRL's function: same numbers, one warning."""
    trl_model = tiny.make_model(logit_scale=logit_scale)
    our_model = copy.deepcopy(trl_model)
    outputs = ("log_probs", "entropy", "mean_logits")
    add_fused_lm_head(trl_model, outputs=outputs)
    install_fused_lm_head(our_model, outputs=outputs)
    ids = torch.randint(2, 44, (2, 7))
    want = trl_model(input_ids=ids, labels=ids, fused_lm_head=True)
    got, messages = collect_fallbacks(lambda: our_model(input_ids=ids, labels=ids, fused_lm_head=True))
    assert len(messages) == 1 and f"logit scale of {logit_scale}" in messages[0]
    for name in ("loss", "log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
    _, again = collect_fallbacks(lambda: our_model(input_ids=ids, labels=ids, fused_lm_head=True))
    assert again == []  # once per reason


def test_drop_in_functions_fall_back_to_trl():
    torch.manual_seed(0)
    hidden, weight = torch.randn(9, 8), torch.randn(13, 8)
    targets = torch.randint(0, 13, (9,))
    # a negative logit scale: TRL's function, same numbers
    got, messages = collect_fallbacks(lambda: functions.ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, 32, None, -1.0))
    want = TRL_LOGPROB.apply(hidden, weight, None, targets, 1.0, 32, None, -1.0)
    assert len(messages) == 1 and "logit scale" in messages[0]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    teacher = torch.randn(9, 6), torch.randn(13, 6)
    for beta, reason in ((1.5, "beta=1.5"), (0.5, "no rows")):
        rows = hidden if beta != 0.5 else hidden[:0]
        teacher_rows = teacher[0] if beta != 0.5 else teacher[0][:0]
        got, messages = collect_fallbacks(lambda: functions.ChunkedDivergenceFunction.apply(
            rows, weight, None, teacher_rows, teacher[1], None, beta))
        want = TRL_DIVERGENCE.apply(rows, weight, None, teacher_rows, teacher[1], None, beta)
        assert len(messages) == 1 and reason in messages[0]
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_zero3_runs_trl_functions(monkeypatch):
    """Under DeepSpeed ZeRO-3 our backward would read a re-partitioned LM head: TRL's functions run
    (they gather it in both passes)."""
    monkeypatch.setattr(functions, "zero3_enabled", lambda: True)
    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 8), torch.randn(11, 8)
    calls = []
    monkeypatch.setattr(TRL_LOGPROB, "apply", lambda *args: calls.append("logprob") or ("trl",))
    monkeypatch.setattr(TRL_DIVERGENCE, "apply", lambda *args: calls.append("divergence") or ("trl",))
    _, messages = collect_fallbacks(lambda: functions.ChunkedLogProbFunction.apply(
        hidden, weight, None, torch.zeros(5, dtype=torch.long), 1.0, 32))
    _, more = collect_fallbacks(lambda: functions.ChunkedDivergenceFunction.apply(
        hidden, weight, None, hidden, weight, None, 0.5))
    assert calls == ["logprob", "divergence"]
    assert all("ZeRO-3" in m for m in messages + more) and len(messages + more) == 2


# ---------------------------------------------------------------------------------------------
# install_fused_lm_head
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(outputs="entropy"), TypeError, "outputs must be a tuple"),
    (dict(outputs=("log_probs", "logits")), ValueError, r"unknown name\(s\) \['logits'\]"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=True), TypeError, "temperature must be a number"),
    (dict(cast_lm_head_to_fp32="no"), TypeError, "cast_lm_head_to_fp32 must be a bool"),
    (dict(backend="cuda"), ValueError, "backend must be"),
])
def test_install_fused_lm_head_bad_arguments(kwargs, error, match):
    model = tiny.make_model(num_layers=1)
    forward = model.forward
    with pytest.raises(error, match=match):
        install_fused_lm_head(model, **kwargs)
    assert model.forward == forward  # nothing installed


def test_all_ignored_micro_batch_is_a_differentiable_zero():
    """TRL's head keeps an all-ignored micro-batch connected to the model (a zero loss whose
    backward runs, so data-parallel ranks stay in step); ours too."""
    model = tiny.make_model(num_layers=1)
    install_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(2, 44, (2, 5))
    out = model(input_ids=ids, labels=torch.full_like(ids, -100), fused_lm_head=True)
    assert out.loss.item() == 0 and not out.label_mask.any() and not out.is_top1.any()
    assert torch.count_nonzero(out.log_probs) == 0 and torch.count_nonzero(out.entropy) == 0
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and torch.count_nonzero(model.lm_head.weight.grad) == 0


def test_vision_language_model_head_matches_trl():
    """A tiny Qwen2-VL with one image: the language backbone and head are found through the text
    config, as TRL's head finds them; the image tokens feed the hidden states."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=None,
                         eos_token_id=tiny.EOS),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=1,
                           temporal_patch_size=1, in_channels=3),
        image_token_id=90, vision_start_token_id=91, vision_end_token_id=92, video_token_id=93)
    torch.manual_seed(0)
    trl_model = Qwen2VLForConditionalGeneration(config)
    our_model = copy.deepcopy(trl_model)
    outputs = ("log_probs", "entropy", "is_top1")
    add_fused_lm_head(trl_model, temperature=0.8, outputs=outputs)
    install_fused_lm_head(our_model, temperature=0.8, outputs=outputs, backend="torch")
    ids = torch.tensor([[5, 91] + [90] * 16 + [92, 7, 8, 9, 10]] * 2)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(32, 12), image_grid_thw=torch.tensor([[1, 4, 4]] * 2),
                  mm_token_type_ids=(ids == 90).long(), labels=ids.masked_fill(torch.arange(23) < 19, -100),
                  fused_lm_head=True)
    want, got = trl_model(**inputs), our_model(**inputs)
    assert torch.count_nonzero(want.log_probs) == 2 * 4
    for name in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)
    assert torch.equal(got.is_top1, want.is_top1)
    got.loss.backward()
    want.loss.backward()
    visual = [name for name, p in trl_model.named_parameters() if "visual" in name and p.grad is not None]
    assert visual  # the image reaches the loss
    ours = dict(our_model.named_parameters())
    for name, p in trl_model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_head_marks_itself_for_the_grpo_loss():
    model = tiny.make_model(num_layers=1)
    assert not fused_head.has_grpo_kernels_head(model)
    install_fused_lm_head(model)
    assert fused_head.has_grpo_kernels_head(model)


def test_patched_add_fused_lm_head_installs_trl_head_for_what_ours_refuses():
    """TRL's add_fused_lm_head takes any temperature and ignores unknown output names; ours refuses
    them, so under the patch such a call installs TRL's own head (one warning), as unpatched TRL."""
    patch_trl(backend="torch")
    ids = torch.randint(2, 44, (2, 6))
    for kwargs, reason in ((dict(temperature=-0.5), "temperature must be finite and > 0"),
                           (dict(outputs=("log_probs", "logits")), "unknown name")):
        ours, theirs = tiny.make_model(num_layers=1), tiny.make_model(num_layers=1)
        _, messages = collect_fallbacks(lambda: trl.trainer.utils.add_fused_lm_head(ours, **kwargs))
        assert len(messages) == 1 and reason in messages[0]
        assert not fused_head.has_grpo_kernels_head(ours)
        TRL_HEAD(theirs, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(ours(input_ids=ids, labels=ids, fused_lm_head=True).log_probs,
                                       theirs(input_ids=ids, labels=ids, fused_lm_head=True).log_probs, rtol=0, atol=0)


def test_no_rows_run_trl_functions():
    """An all-masked micro-batch that TRL compacts to no rows (on CUDA), or sequences of one token:
    TRL's function, a differentiable empty result."""
    hidden, weight = torch.randn(0, 8, requires_grad=True), torch.randn(13, 8, requires_grad=True)
    out, messages = collect_fallbacks(lambda: functions.ChunkedLogProbFunction.apply(
        hidden, weight, None, torch.zeros(0, dtype=torch.long), 1.0, 32))
    assert len(messages) == 1 and "no rows" in messages[0]
    assert out[0].shape == (0,)
    (out[0].sum() + out[1].sum()).backward()
    assert torch.count_nonzero(weight.grad) == 0
    model = tiny.make_model(num_layers=1)
    install_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(2, 44, (3, 1))  # one token: nothing to predict
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert out.log_probs.shape == (3, 0) and out.loss.item() == 0
