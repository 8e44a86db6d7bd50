"""Offline stand-ins for what TRL's own tests download, and the patched-vs-unpatched comparison.

TRL's trainer tests load ``trl-internal-testing/tiny-*`` models and ``trl-internal-testing/zen``
datasets from the Hub; here the same kinds of objects are built in memory: a tiny Qwen2 from a
config (hidden 32, 2 layers, vocabulary 97 of which the tokenizer uses 44 ids), a word-level
tokenizer, and small datasets in TRL's formats (prompt-only, preference, unpaired preference,
language modeling).

:func:`run_pair` trains the same trainer twice on the same seed, with TRL as it is and under
``patched_trl()``, and :func:`assert_same_logs` compares the logged loss, grad norm and every
metric step by step.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

WORDS = [f"w{i}" for i in range(42)]
PAD, EOS = 0, 1
VOCAB = 97  # 44 tokenizer ids; the rest are never sampled (an LM head larger than the tokenizer)
# Logged keys that measure time, not math.
TIMING_KEYS = ("time", "per_second")


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """One intra-op thread for the module: these models are tiny, and on a shared 2-core machine
    OpenMP's second thread makes each of their matmuls ~100x slower (spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokenizer():
    vocab = {"<pad>": PAD, "<eos>": EOS, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def make_model(seed=0, hidden_size=32, num_layers=2, sharpen=6.0, **config_extra):
    """A tiny Qwen2 causal LM; the LM head is scaled up so that next-token distributions are
    peaked (ratios, entropies and clip fractions then vary between tokens)."""
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=48, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, **config_extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def save_model(path, **kwargs) -> str:
    make_model(**kwargs).save_pretrained(path)
    return str(path)


def words(generator, low, high):
    n = int(torch.randint(low, high + 1, (1,), generator=generator))
    return " ".join(WORDS[int(i)] for i in torch.randint(2, len(WORDS), (n,), generator=generator))


def prompt_dataset(n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"prompt": [words(generator, 1, 4) for _ in range(n)]})


def preference_dataset(n=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({
        "prompt": [words(generator, 1, 3) for _ in range(n)],
        "chosen": [words(generator, 1, 5) for _ in range(n)],
        "rejected": [words(generator, 1, 5) for _ in range(n)],
    })


def unpaired_preference_dataset(n=8, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({
        "prompt": [words(generator, 1, 3) for _ in range(n)],
        "completion": [words(generator, 1, 5) for _ in range(n)],
        "label": [bool(i % 2) for i in range(n)],
    })


def language_modeling_dataset(n=8, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"text": [words(generator, 3, 9) for _ in range(n)]})


def reward_count(completions, **kwargs):
    return [c.count("w3") + c.count("w7") + 0.25 * len(c.split()) for c in completions]


def reward_short(completions, **kwargs):
    return [-0.1 * len(c) for c in completions]


def common_args(output_dir, **overrides) -> dict:
    """What every adapted test sets: CPU, float32, a few logged steps, no checkpoints, and plain
    SGD: an update is then the learning rate times the gradient, so step k compares the two
    implementations' gradients. (Adam divides each gradient element by its own magnitude: where a
    gradient is zero up to rounding, its update is rounding noise scaled to the learning rate, and
    later steps would compare noise.)"""
    args = dict(output_dir=str(output_dir), max_steps=2, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                save_strategy="no", seed=11, disable_tqdm=True, learning_rate=0.05, optim="sgd")
    args.update(overrides)
    return args


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run_pair(make_trainer, backend="torch", grpo_loss=True, check_kernels=True):
    """Train ``make_trainer(tag)`` twice: TRL as it is, then under ``patched_trl``. Returns
    ``(trl_trainer, patched_trainer, before)``, trained; ``before``: the parameters before training.

    With ``check_kernels``, the patched run must never reach TRL's own chunked functions (a
    fallback would make the comparison vacuous).
    """
    from unittest import mock

    from grpo_kernels.integrations.trl import functions, patched_trl

    reference = make_trainer("trl")
    before = snapshot(reference.model)
    reference.train()

    def forbidden(*args, **kwargs):
        raise AssertionError("the patched run reached TRL's own chunked function")

    with patched_trl(backend=backend, grpo_loss=grpo_loss):
        patched = make_trainer("patched")
        guards = [mock.patch.object(functions.TRL_CHUNKED_LOGPROB, "apply", forbidden),
                  mock.patch.object(functions.TRL_CHUNKED_DIVERGENCE, "apply", forbidden)] if check_kernels else []
        for guard in guards:
            guard.start()
        try:
            patched.train()
        finally:
            for guard in guards:
                guard.stop()
    return reference, patched, before


def step_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_same_logs(reference, patched, rel=1e-5, abs_tol=1e-7, min_steps=2):
    """Same logged keys at every step, and every numeric value within ``rel`` (relative; values
    near 0 within ``abs_tol``): loss, grad norm, learning rate, TRL's metrics."""
    want_logs, got_logs = step_logs(reference), step_logs(patched)
    assert len(want_logs) == len(got_logs) >= min_steps
    for step, (want, got) in enumerate(zip(want_logs, got_logs)):
        keys = {k for k in want if not any(t in k for t in TIMING_KEYS)}
        assert keys == {k for k in got if not any(t in k for t in TIMING_KEYS)}, f"step {step}: logged keys differ"
        assert {"loss", "grad_norm"} <= keys
        for key in sorted(keys):
            a, b = want[key], got[key]
            if isinstance(a, float) and math.isnan(a):
                assert isinstance(b, float) and math.isnan(b), f"step {step} {key}: TRL NaN, patched {b}"
                continue
            assert math.isclose(b, a, rel_tol=rel, abs_tol=abs_tol), (
                f"step {step} {key}: patched {b!r} vs TRL {a!r} (relative {abs(b - a) / max(abs(a), 1e-30):.2e})")
    assert any(abs(entry["grad_norm"]) > 0 for entry in want_logs)  # the runs trained something


def assert_trained(trainer, before, frozen=()):
    """TRL's own check after training: the loss was logged and every trainable parameter moved
    (parameters whose names contain one of ``frozen`` must not)."""
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for name, value in before.items():
        new = trainer.model.get_parameter(name)
        if any(f in name for f in frozen):
            torch.testing.assert_close(value, new, msg=f"Parameter {name} has changed.")
        elif new.requires_grad:
            assert not torch.equal(value, new), f"Parameter {name} has not changed."
