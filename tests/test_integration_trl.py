"""FusedGRPOTrainer against TRL's own GRPOTrainer, on the real TRL (CPU, offline).

A tiny Qwen2 built from a config, a word-level tokenizer built in memory, a four-prompt dataset
and reward functions defined here. Completions come from a seeded ``rollout_func`` (TRL's
public hook), so both trainers see the same completions without sampling from the model.
Optimizer: plain SGD, so that a parameter update is the learning rate times the gradient and the
comparison of updates is a comparison of gradients.
"""

import copy
import math
from collections import defaultdict

import pytest
import torch
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2MoeConfig
from trl import GRPOConfig, GRPOTrainer

from grpo_kernels.integrations.trl import FusedGRPOTrainer, TRLFallbackWarning, _compat, fused_loss_fallback_reason
from trl_tiny import one_thread  # noqa: F401

pytestmark = [pytest.mark.filterwarnings(
    "ignore:You are using 'rollout_func'", "ignore::FutureWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread")]

WORDS = [f"w{i}" for i in range(40)]
PAD, EOS = 0, 1
VOCAB = 53  # 42 tokenizer ids, the rest never sampled (an LM head larger than the tokenizer)
MAX_COMPLETION = 6


def make_tokenizer():
    vocab = {"<pad>": PAD, "<eos>": EOS, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def make_model(**config_extra):
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=PAD,
        eos_token_id=EOS, bos_token_id=None, **config_extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # peaked next-token distributions, so ratios and entropies vary
        model.lm_head.weight.mul_(8.0)
    return model


def make_rollout():
    """Seeded completions: varying lengths, some ending in EOS, some truncated."""
    calls = {"n": 0}

    def rollout(prompts, trainer):
        generator = torch.Generator().manual_seed(1000 + calls["n"])
        calls["n"] += 1
        prompt_ids = [trainer.processing_class(p)["input_ids"] for p in prompts]
        completion_ids = []
        for _ in prompts:
            length = int(torch.randint(1, MAX_COMPLETION + 1, (1,), generator=generator))
            ids = torch.randint(2, 2 + len(WORDS), (length,), generator=generator).tolist()
            if torch.rand(1, generator=generator) < 0.6:
                ids[-1] = EOS
            completion_ids.append(ids)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


def reward_count(completions, **kwargs):
    return [c.count("w3") + c.count("w7") + 0.25 * len(c.split()) for c in completions]


def reward_short(completions, **kwargs):
    return [-0.1 * len(c) for c in completions]


DATASET = {"prompt": ["w1 w2 w5", "w7 w8", "w9 w10 w11 w12", "w4"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Saves a tiny model (config extras as keyword arguments) and returns its path.

    TRL builds the reference model from the policy's path, so the policy is loaded from disk.
    """
    saved = {}

    def save(**config_extra):
        key = tuple(sorted(config_extra.items()))
        if key not in saved:
            path = tmp_path_factory.mktemp("tiny-qwen2")
            make_model(**config_extra).save_pretrained(path)
            saved[key] = str(path)
        return saved[key]

    return save


def make_config(output_dir, **overrides):
    config = dict(
        output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=MAX_COMPLETION, learning_rate=0.05, optim="sgd", logging_steps=1,
        report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=7, disable_tqdm=True)
    config.update(overrides)
    return GRPOConfig(**config)


def build(trainer_cls, model, args, **kwargs):
    kwargs.setdefault("reward_funcs", [reward_count, reward_short])
    return trainer_cls(
        model=model, args=args, train_dataset=Dataset.from_dict(DATASET), processing_class=make_tokenizer(),
        rollout_func=make_rollout(), **kwargs)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


LOGGED_KEYS = ("loss", "grad_norm", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
               "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio",
               "policy_loss", "entropy_coef", "reward", "frac_reward_zero_std")


TRAINING_CASES = {
    # TRL's defaults (dapo, bias-corrected KL) with a reference model and temperature; one
    # generation feeds 4 micro-batches, 2 per optimizer step, each seen twice (num_iterations), so
    # old log-probs are recomputed and dapo's normalizer is num_items_in_batch * 2 / 4.
    "dapo-beta-iterations": dict(beta=0.04, num_iterations=2, gradient_accumulation_steps=2, steps_per_generation=4,
                                 temperature=0.7, epsilon_high=0.28),
    # GSPO-style sequence-level ratios with grpo aggregation, two-sided clip, entropy masking and an
    # entropy bonus, stale completions (generation every 4 micro-batches, a step every 2), and a
    # logit scale that the trainer folds into the temperature.
    "grpo-sequence-entropy": dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.5,
                                  steps_per_generation=4, gradient_accumulation_steps=2,
                                  top_entropy_quantile=0.5, entropy_coef=0.01, max_steps=4,
                                  model_config=dict(logit_scale=1.5)),
    # CISPO with adaptive entropy control (its bonus scaled by the accumulation steps), the KL
    # without bias correction, and two iterations per generation.
    "cispo-adaptive-entropy": dict(loss_type="cispo", epsilon_high=1.2, beta=0.02, use_bias_correction_kl=False,
                                   num_iterations=2, gradient_accumulation_steps=2, use_adaptive_entropy=True,
                                   entropy_coef=0.01, entropy_target=10.0),
    # LoRA: the fused head goes on the base model, the reference is the model with adapters off.
    "lora-bnpo-beta": dict(loss_type="bnpo", beta=0.1, num_iterations=2, steps_per_generation=2,
                           gradient_accumulation_steps=1, peft=True),
}


@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_training_matches_trl(case, model_dir, tmp_path, monkeypatch):
    overrides = dict(TRAINING_CASES[case])
    path = model_dir(**overrides.pop("model_config", {}))
    extra = {}
    if overrides.pop("peft", False):
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    trl_trainer = build(GRPOTrainer, path, make_config(tmp_path / "trl", **overrides), **extra)
    before = snapshot(trl_trainer.model)
    trl_trainer.train()
    trl_after = snapshot(trl_trainer.model)

    ours = build(FusedGRPOTrainer, path, make_config(tmp_path / "ours", **overrides), **extra)
    for name, value in snapshot(ours.model).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)

    # Our trainer never runs TRL's chunked LM head nor the model's own LM head (no logits) -
    # old and reference log-probs included.
    def forbidden(*args, **kwargs):
        raise AssertionError("full logits or TRL's chunked log-probs were computed")

    monkeypatch.setattr(trl.trainer.utils._ChunkedLogProbFunction, "apply", forbidden)
    monkeypatch.setattr(ours.model.lm_head, "forward", forbidden)
    if ours.ref_model is not None:
        monkeypatch.setattr(ours.ref_model.lm_head, "forward", forbidden)
    ours.train()
    ours_after = snapshot(ours.model)

    trl_logs = [h for h in trl_trainer.state.log_history if "loss" in h]
    our_logs = [h for h in ours.state.log_history if "loss" in h]
    assert len(trl_logs) == len(our_logs) == overrides.get("max_steps", 3)
    for step, (want, got) in enumerate(zip(trl_logs, our_logs)):
        expected_keys = {k for k in LOGGED_KEYS if k in want}
        assert expected_keys == {k for k in LOGGED_KEYS if k in got}, f"step {step}: logged metric names differ"
        for key in expected_keys:
            assert math.isclose(got[key], want[key], rel_tol=1e-4, abs_tol=1e-5), (
                f"step {step} {key}: ours {got[key]} vs TRL {want[key]}")
    moved = 0.0
    for name, want in trl_after.items():
        update_trl = want - before[name]
        update_ours = ours_after[name] - before[name]
        moved = max(moved, update_trl.abs().max().item())
        torch.testing.assert_close(update_ours, update_trl, rtol=1e-3, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert moved > 1e-3  # the comparison is not between two runs that did nothing


# ---------------------------------------------------------------------------------------------
# One loss computation, every option: TRL's _compute_loss against ours on the same inputs
# ---------------------------------------------------------------------------------------------

B, PROMPT, COMPLETION = 6, 3, MAX_COMPLETION
COMPLETION_LENGTHS = (6, 3, 1, 5, 0, 4)  # a row with no completion token (masked truncation)

LOSS_CASES = {
    "grpo-delta-bias-kl": dict(loss_type="grpo", epsilon_high=0.28, delta=1.3, beta=0.04, old=True),
    "bnpo-tool-mask": dict(loss_type="bnpo", tool_mask=True, old=True),
    "dr_grpo-sequence": dict(loss_type="dr_grpo", importance_sampling_level="sequence", old=True, beta=0.04),
    "dapo-vllm-token-is": dict(loss_type="dapo", is_ratio="token", old=True, entropy_coef=0.05,
                               steps_per_generation=4),
    "cispo-vllm-sequence-is": dict(loss_type="cispo", epsilon_high=1.5, is_ratio="sequence", old=True, beta=0.04,
                                   use_bias_correction_kl=False, entropy_coef=0.02),
    "sapo-entropy-mask": dict(loss_type="sapo", top_entropy_quantile=0.3, entropy_coef=0.02, old=True),
    "luspo-sequence": dict(loss_type="luspo", importance_sampling_level="sequence", old=True, beta=0.04),
    "luspo-token": dict(loss_type="luspo", old=True),
    "grpo-off-policy-mask": dict(loss_type="grpo", off_policy_mask_threshold=0.05, old=True, sampling=True),
    "grpo-sequence-entropy-mask": dict(loss_type="grpo", importance_sampling_level="sequence",
                                       top_entropy_quantile=0.5, old=True, delta=2.0),
    "bnpo-per-token-advantages": dict(loss_type="bnpo", token_advantages=True, old=True),
    "dapo-on-policy-eval": dict(loss_type="dapo", beta=0.04, eval=True),
    "dapo-on-policy-adaptive-entropy": dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.03,
                                            entropy_target=100.0),
    # adaptive control whose gate is closed (entropy above target): no bonus this step
    "grpo-adaptive-entropy-gated": dict(loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.03,
                                        entropy_target=0.5, old=True),
    # delta below 1 + epsilon_high: TRL reports clip ratios of the delta-capped ratio
    "bnpo-small-delta": dict(loss_type="bnpo", epsilon_high=0.3, delta=1.1, old=True),
    # every row clipped low (stale, much likelier old policy and negative advantages): clip_ratio/low_min > 0
    "dapo-all-clipped-low": dict(loss_type="dapo", old=True, old_shift=1.0, negative_advantages=True),
    "vespo-vllm-token-is": dict(loss_type="vespo", is_ratio="token", old=True, beta=0.04, entropy_coef=0.02),
    "vespo-on-policy": dict(loss_type="vespo", steps_per_generation=4),
}

# What a case sets on the trainer, and on its args, with GRPOConfig's defaults otherwise.
TRAINER_DEFAULTS = dict(loss_type="dapo", importance_sampling_level="token", beta=0.0, top_entropy_quantile=1.0,
                        entropy_coef=0.0, use_adaptive_entropy=False, off_policy_mask_threshold=None,
                        epsilon_high=0.2)
ARGS_DEFAULTS = dict(delta=None, use_bias_correction_kl=True, steps_per_generation=2, entropy_target=0.2)


def build_pair(path, out):
    """TRL's trainer and ours on the same weights, temperature 0.8, with a reference model."""
    common = dict(beta=0.04, temperature=0.8, gradient_accumulation_steps=2)
    return (build(GRPOTrainer, path, make_config(out / "trl", **common)),
            build(FusedGRPOTrainer, path, make_config(out / "ours", **common)))


@pytest.fixture
def trainer_pair(model_dir, tmp_path):
    # Built per test: building a Trainer resets accelerate's shared state, which a trainer built
    # earlier relies on.
    return build_pair(model_dir(), tmp_path)


def make_inputs(trainer, case):
    generator = torch.Generator().manual_seed(1234)
    prompt_lengths = (3, 2, 3, 1, 3, 2)
    prompt_ids = torch.full((B, PROMPT), PAD)
    prompt_mask = torch.zeros((B, PROMPT), dtype=torch.long)
    completion_ids = torch.full((B, COMPLETION), PAD)
    completion_mask = torch.zeros((B, COMPLETION), dtype=torch.long)
    for row, (n_prompt, n_completion) in enumerate(zip(prompt_lengths, COMPLETION_LENGTHS)):
        prompt_ids[row, PROMPT - n_prompt:] = torch.randint(2, 42, (n_prompt,), generator=generator)
        prompt_mask[row, PROMPT - n_prompt:] = 1
        completion_ids[row, :n_completion] = torch.randint(2, 42, (n_completion,), generator=generator)
        completion_mask[row, :n_completion] = 1
    advantages = torch.randn(B, generator=generator)
    advantages[1] = 0.0
    if case.get("negative_advantages"):
        advantages = -advantages.abs() - 0.1
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=advantages,
                  num_items_in_batch=completion_mask.sum() * 3)
    if case.get("token_advantages"):
        inputs["advantages"] = advantages[:, None] + 0.5 * torch.randn(B, COMPLETION, generator=generator)

    # log-probs of the current policy (TRL's own computation), perturbed into old/ref/sampling ones
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            COMPLETION)

    def perturbed(scale):
        return (logps + scale * torch.randn(logps.shape, generator=generator)) * completion_mask

    if case.get("old"):
        inputs["old_per_token_logps"] = perturbed(0.4) + case.get("old_shift", 0.0) * completion_mask
    inputs["ref_per_token_logps"] = perturbed(0.3)
    if case.get("sampling"):
        sampling = perturbed(0.3)
        sampling[0, 1] = float("nan")  # a token the rollout engine could not score
        inputs["sampling_per_token_logps"] = sampling
    if case.get("is_ratio") == "token":
        inputs["importance_sampling_ratio"] = torch.exp(0.3 * torch.randn(B, COMPLETION, generator=generator))
    elif case.get("is_ratio") == "sequence":
        inputs["importance_sampling_ratio"] = torch.exp(0.3 * torch.randn(B, 1, generator=generator))
    if case.get("tool_mask"):
        inputs["tool_mask"] = (torch.rand(B, COMPLETION, generator=generator) > 0.3).long()
    return inputs


def run_compute_loss(trainer, inputs, case):
    for name, default in TRAINER_DEFAULTS.items():
        setattr(trainer, name, case.get(name, default))
    for name, default in ARGS_DEFAULTS.items():
        setattr(trainer.args, name, case.get(name, default))
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0 or trainer.use_adaptive_entropy
    trainer._last_world_entropy = 1.0  # adaptive control: below the target, so the bonus applies
    trainer._entropy_window_stats = None
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = "is_ratio" in case
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train(not case.get("eval"))
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    loss = trainer._compute_loss(trainer.model, copy.deepcopy(inputs))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    mode = "eval" if case.get("eval") else "train"
    metrics = {name: values[-1] for name, values in trainer._metrics[mode].items()}
    return loss.detach(), grads, metrics, trainer.entropy_coef


@pytest.mark.parametrize("case_name", list(LOSS_CASES))
def test_compute_loss_matches_trl(case_name, trainer_pair):
    check_compute_loss(*trainer_pair, LOSS_CASES[case_name])


def test_moe_aux_loss_matches_trl(tmp_path):
    """A mixture-of-experts policy: TRL adds the router load-balancing loss, and logs it."""
    config = Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.05,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    trl_trainer, ours = build_pair(str(tmp_path / "moe"), tmp_path)
    assert ours.aux_loss_enabled
    check_compute_loss(trl_trainer, ours, dict(loss_type="dapo", old=True, beta=0.04))


def check_compute_loss(trl_trainer, ours, case):
    inputs = make_inputs(trl_trainer, case)
    want_loss, want_grads, want_metrics, want_coef = run_compute_loss(trl_trainer, inputs, case)
    got_loss, got_grads, got_metrics, got_coef = run_compute_loss(ours, inputs, case)

    assert want_loss.abs() > 1e-4
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-6)
    assert set(got_grads) == set(want_grads)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-3, atol=1e-5 * want.abs().max().item() + 1e-7,
                                   msg=lambda m: f"grad of {name}: {m}")
    assert set(got_metrics) == set(want_metrics)
    for name, want in want_metrics.items():
        got = got_metrics[name]
        assert (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-6), (
            f"metric {name}: ours {got} vs TRL {want}")
    assert got_coef == want_coef


# ---------------------------------------------------------------------------------------------
# The fused LM head (old / reference log-probs) against TRL's
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-model-fp32-head"])
@pytest.mark.parametrize("shifted", [False, True])
def test_fused_lm_head_matches_trl(precision, shifted, model_config=(("logit_scale", 1.25),)):
    from trl.trainer.utils import add_fused_lm_head

    from grpo_kernels.integrations.trl import install_fused_lm_head

    trl_model = make_model(**dict(model_config))
    cast_head = precision == "bf16-model-fp32-head"
    if cast_head:  # what GRPOTrainer does for cast_lm_head_to_fp32=True on a bf16 model
        trl_model = trl_model.to(torch.bfloat16)
        trl_model.lm_head = trl_model.lm_head.float()
    our_model = copy.deepcopy(trl_model)
    outputs_wanted = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    add_fused_lm_head(trl_model, temperature=0.7, cast_lm_head_to_fp32=cast_head, outputs=outputs_wanted)
    install_fused_lm_head(our_model, temperature=0.7, cast_lm_head_to_fp32=cast_head, outputs=outputs_wanted)

    input_ids = torch.randint(2, 42, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # prompt
    # pre-shifted labels (as under context parallelism) are scored at every position, unshifted
    shift_labels = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    kwargs = dict(shift_labels=shift_labels) if shifted else dict(labels=labels)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    outputs = []
    for model in (trl_model, our_model):
        with autocast:
            out = model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=True, **kwargs)
        out.loss.backward()
        grads = {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}
        outputs.append((out.log_probs.float(), out.entropy.float(), out.loss.float(), grads,
                        (out.log_sum_sq_probs, out.mean_logits, out.is_top1, out.label_mask)))
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=3e-2, atol=3e-2)
    (want_logp, want_ent, want_loss, want_grads, want_stats), (got_logp, got_ent, got_loss, got_grads, got_stats) = \
        outputs
    for name, want, got in zip(("log_sum_sq_probs", "mean_logits"), want_stats, got_stats):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")
    mask = want_stats[3]
    assert torch.equal(got_stats[3], mask)
    if precision == "fp32":  # the top-1 flag is exact where no two logits are within rounding
        assert torch.equal(got_stats[2], want_stats[2])
    assert not got_stats[2][~mask].any()
    assert got_logp.shape == want_logp.shape
    assert (got_logp[:, :3] == 0).all() and (want_logp[:, :3] == 0).all()  # the prompt is not scored
    torch.testing.assert_close(got_logp, want_logp, **tol)
    torch.testing.assert_close(got_ent, want_ent, **tol)
    torch.testing.assert_close(got_loss, want_loss, **tol)
    assert set(got_grads) == set(want_grads)
    for name, want in want_grads.items():
        scale = want.abs().max().item()
        torch.testing.assert_close(got_grads[name], want, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-3),
                                   msg=lambda m: f"grad of {name}: {m}")


# ---------------------------------------------------------------------------------------------
# What the fused loss does not implement runs TRL's loss on our head (nothing is refused)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, message", [
    (dict(loss_type="vespo", importance_sampling_level="sequence", old=True), "importance_sampling_level='sequence'"),
    (dict(loss_type="cispo", importance_sampling_level="sequence", old=True, epsilon_high=1.5),
     "importance_sampling_level='sequence'"),
    (dict(loss_type="sapo", importance_sampling_level="sequence", old=True, beta=0.04), "importance_sampling_level"),
    (dict(loss_type="grpo", epsilon_low=-0.1, old=True), "epsilon_low must be >= 0"),
])
def test_unsupported_options_fall_back_to_trl_loss(case, message, trainer_pair, monkeypatch):
    """Options the fused loss does not implement (FusedGRPOTrainer refused them before): the call
    computes TRL's own loss on grpo-kernels' head, with one warning naming the reason, and gives
    TRL's numbers."""
    from grpo_kernels.integrations.trl import grpo as fused_grpo

    trl_trainer, ours = trainer_pair
    if "epsilon_low" in case:  # a trainer attribute TRL's loss reads (TRAINER_DEFAULTS does not set it)
        trl_trainer.epsilon_low = ours.epsilon_low = case["epsilon_low"]
    monkeypatch.setattr(fused_grpo, "_fused_compute_loss", lambda *a: pytest.fail("the fused loss ran"))
    monkeypatch.setattr(_compat, "_WARNED", set())
    with pytest.warns(TRLFallbackWarning, match=message):
        check_compute_loss(trl_trainer, ours, case)


def test_entropy_mask_on_several_processes_falls_back(tmp_path):
    """TRL takes the entropy quantile over all ranks; the fused loss over its micro-batch: on several
    processes the call runs TRL's loss (TRL's all-gathered quantile) on our head."""
    base = GRPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, loss_type="dapo", top_entropy_quantile=0.2,
                      report_to="none")
    assert "several processes" in fused_loss_fallback_reason(base, num_processes=2)
    assert fused_loss_fallback_reason(base, num_processes=1) is None


def test_softcapped_model_fused_lm_head_matches_trl():
    # Gemma 2/3's final_logit_softcapping, applied after the logit scale as TRL does; the tiny
    # model's logits reach ~10, so a cap of 2 changes every distribution.
    test_fused_lm_head_matches_trl("fp32", False, model_config=(("logit_scale", 1.25), ("final_logit_softcapping", 2.0)))


def test_bad_backend_and_trl_version_raise(model_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="kernel_backend"):
        build(FusedGRPOTrainer, model_dir(), make_config(tmp_path), kernel_backend="cuda")
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(ImportError, match=r"trl>=1.16,<1.17"):
        build(FusedGRPOTrainer, model_dir(), make_config(tmp_path))


def test_fused_lm_head_keeps_the_forward_signature():
    # `generate` validates its model kwargs against `forward`'s signature (e.g. logits_to_keep).
    import inspect

    from grpo_kernels.integrations.trl import install_fused_lm_head

    model = make_model()
    before = set(inspect.signature(model.forward).parameters)
    install_fused_lm_head(model)
    assert "logits_to_keep" in before and before <= set(inspect.signature(model.forward).parameters)
    prompt = torch.tensor([[1, 2, 3]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False,
                         logits_to_keep=1)
    assert out.shape == (1, 5)
