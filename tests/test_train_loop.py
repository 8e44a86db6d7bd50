"""The GRPO trainer on one process with a tiny Qwen2: token alignment, attention paths, skipped
non-finite steps, exact resume, dynamic sampling, GFPO, LoRA reference, the CLI and the demo."""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels.demo import addition_reward, build_model, build_tokenizer
from grpo_kernels.train import GRPOConfig, GRPOTrainer
from grpo_kernels.train.distributed import PolicyHead
from grpo_kernels.train.rollout import Rollout, completion_mask_from_eos

ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)] + [
    {"prompt": "12+3=", "answer": "15"},
    {"prompt": "4=", "answer": "4"},
]


def tiny_trainer(output_dir, *, model=None, tokenizer=None, reward_funcs=(addition_reward,), rows=ROWS, **overrides):
    tokenizer = tokenizer or build_tokenizer()
    model = model or build_model(tokenizer, hidden_size=32, seed=0)
    options = dict(
        prompts_per_step=3, num_generations=4, max_new_tokens=4, micro_batch_size=5, learning_rate=3e-3,
        max_steps=2, mode="single", seed=0, output_dir=str(output_dir), progress_bar=False, save_final_model=False,
    )
    options.update(overrides)
    reward_funcs = None if reward_funcs is None else list(reward_funcs)  # None: the config's reward_funcs
    return GRPOTrainer(GRPOConfig(**options), model=model, tokenizer=tokenizer, dataset=rows, reward_funcs=reward_funcs)


def params_of(trainer):
    return {name: p.detach().clone() for name, p in trainer.policy.named_parameters()}


# --- token alignment ------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_logprobs_match_what_generate_sampled_from(tmp_path, packing):
    """hidden[t] predicts token t+1: the trainer's fused log-probs of the sampled completion tokens
    equal log_softmax(logits / T) of the very logits ``generate`` sampled them from, with
    left-padded prompts of different lengths and completions cut at EOS."""
    temperature = 0.7
    trainer = tiny_trainer(tmp_path, temperature=temperature, packing=packing)
    tokenizer, model = trainer.tokenizer, trainer.model
    prompts = ["12+3=", "1+2=", "4=", "3+3+3="]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (encoded["attention_mask"] == 0).any(), "the test needs left padding"
    out = model.generate(
        **encoded, do_sample=True, temperature=temperature, top_k=0, max_new_tokens=6, output_logits=True,
        return_dict_in_generate=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    completion_ids = out.sequences[:, encoded["input_ids"].shape[1]:]
    mask = completion_mask_from_eos(completion_ids, [tokenizer.eos_token_id])
    logits = torch.stack(out.logits, 1).float() / temperature
    expected = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1) * mask
    batch = Rollout(encoded["input_ids"], encoded["attention_mask"], completion_ids * mask, mask, prompts, [""] * 4, [{}] * 4)
    got = trainer.logprobs(trainer.policy, batch)
    torch.testing.assert_close(got * mask, expected, atol=2e-5, rtol=1e-4)
    # a wrong alignment (hidden[t] scored against token t) is far off: the test can fail
    assert (got * mask - torch.roll(expected, 1, dims=1) * mask).abs().max() > 1e-2


# --- attention paths, packing, gradient checkpointing ---------------------------------------


def _fixed_batch(trainer):
    batch, _ = trainer.make_batch()
    batch.advantages = torch.linspace(-1.5, 1.5, len(batch))  # every row carries signal
    return batch


def test_sdpa_eager_packed_and_checkpointed_paths_agree(tmp_path):
    """Same batch, same weights: SDPA, eager, packed sequences (the flash-attention layout, here with
    transformers' block-causal masks) and gradient checkpointing give the same loss, metrics and
    updated parameters (mu=2 with old and reference log-probs)."""
    options = dict(num_iterations=2, beta=0.05, micro_batch_size=5, temperature=0.9)
    tokenizer = build_tokenizer()
    batch = _fixed_batch(tiny_trainer(tmp_path / "gen", tokenizer=tokenizer, **options))
    assert batch.prompt_mask.min() == 0 and batch.completion_mask.min() == 0, "want padding on both sides"
    results = {}
    for attn, packing, checkpointing in [("sdpa", False, False), ("eager", False, False), ("sdpa", True, False),
                                         ("eager", True, False), ("sdpa", False, True)]:
        model = build_model(tokenizer, hidden_size=32, attn_implementation=attn, seed=0)
        trainer = tiny_trainer(tmp_path / attn, model=model, tokenizer=tokenizer, packing=packing,
                               gradient_checkpointing=checkpointing, **options)
        assert trainer.packing is packing
        metrics = trainer.update(batch)
        results[(attn, packing, checkpointing)] = (metrics, params_of(trainer))
    (reference_metrics, reference_params), *others = results.values()
    for metrics, params in others:
        for key in ("loss", "loss_last_iteration", "kl", "entropy", "grad_norm"):
            assert metrics[key] == pytest.approx(reference_metrics[key], rel=1e-4, abs=1e-6), key
        for name, value in params.items():
            torch.testing.assert_close(value, reference_params[name], atol=1e-5, rtol=1e-4)
    assert reference_metrics["skipped_updates"] == 0 and reference_metrics["kl"] > 0


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available(),
    reason="flash-attn is not installed (it needs CUDA): the flash_attention_2 + packing path cannot run here; "
    "the packing logic itself is covered by test_sdpa_eager_packed_and_checkpointed_paths_agree",
)
def test_flash_attention_packed_matches_sdpa(tmp_path):
    tokenizer = build_tokenizer()
    options = dict(device="cuda", dtype="bfloat16", beta=0.05)
    batch = _fixed_batch(tiny_trainer(tmp_path / "gen", tokenizer=tokenizer, **options))
    losses = {}
    for attn in ("sdpa", "flash_attention_2"):
        model = build_model(tokenizer, hidden_size=64, attn_implementation=attn, seed=0).to(torch.bfloat16)
        trainer = tiny_trainer(tmp_path / attn, model=model, tokenizer=tokenizer, **options)
        assert trainer.packing is (attn == "flash_attention_2")
        losses[attn] = trainer.update(batch)["loss"]
    assert losses["flash_attention_2"] == pytest.approx(losses["sdpa"], rel=2e-2, abs=1e-3)


# --- mixed precision, entropy bonus --------------------------------------------------------


def _output_dtypes(module):
    seen = []
    module.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))
    return seen


def _changed_fraction(before, after):
    changed = sum(int((after[k] != before[k]).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values())


def test_bfloat16_compute_keeps_float32_master_weights(tmp_path):
    """dtype=bfloat16: forward and generation in bfloat16 (autocast), trainable weights and AdamW state
    in float32, so that an lr=1e-6 step changes the weights (bfloat16 weights would round most of it
    away); the frozen reference is stored in bfloat16."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=32, seed=0).to(torch.bfloat16)  # as from_pretrained(dtype=bf16)
    trainer = tiny_trainer(tmp_path, model=model, tokenizer=tokenizer, dtype="bfloat16", beta=0.05, learning_rate=1e-6)
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
    projection_dtypes = _output_dtypes(trainer.model.model.layers[0].self_attn.q_proj)
    batch = _fixed_batch(trainer)  # generation
    assert set(projection_dtypes) == {torch.bfloat16}
    hidden, weight, *_ = trainer.hidden_states(trainer.policy, batch, slice(0, 5))
    assert hidden.dtype == weight.dtype == torch.bfloat16
    before = params_of(trainer)
    metrics = trainer.update(batch)
    assert metrics["skipped_updates"] == 0 and 0 <= metrics["kl"] < 1e-2
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    assert {v.dtype for state in trainer.optimizer.state.values() for v in state.values() if v.ndim} == {torch.float32}
    assert _changed_fraction(before, params_of(trainer)) > 0.9


def test_fsdp2_mixed_precision_and_resharded_reference(tmp_path, monkeypatch):
    """One-process FSDP2 with dtype=bfloat16: parameters gathered in bfloat16, float32 shards and AdamW
    state; the frozen reference's root is resharded after its log-prob pass (no backward does it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    trainer = tiny_trainer(tmp_path, mode="fsdp2", dtype="bfloat16", beta=0.05, learning_rate=1e-6)
    try:
        full = lambda: {k: v.clone() for k, v in get_model_state_dict(
            trainer.policy, options=StateDictOptions(full_state_dict=True)).items()}
        assert {p.to_local().dtype for p in trainer.policy.parameters()} == {torch.float32}
        projection_dtypes = _output_dtypes(trainer.model.model.layers[0].self_attn.q_proj)
        batch = _fixed_batch(trainer)
        reference_embedding = lambda: trainer.reference.model.model.embed_tokens.weight
        trainer.reference_logprobs(batch)
        assert isinstance(reference_embedding(), DTensor), "the reference's gathered root weights stay resident"
        before = full()
        metrics = trainer.update(batch)
        assert set(projection_dtypes) == {torch.bfloat16}
        assert metrics["skipped_updates"] == 0 and isinstance(reference_embedding(), DTensor)
        optimizer_state = [v for state in trainer.optimizer.state.values() for v in state.values() if v.ndim]
        assert {v.to_local().dtype for v in optimizer_state} == {torch.float32}
        assert _changed_fraction(before, full()) > 0.9
    finally:
        trainer.close()


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_entropy_bonus_does_not_depend_on_micro_batching(tmp_path, loss_type):
    """Zero advantages: the loss is the entropy bonus alone, -entropy_coef x the mean entropy over the
    batch's tokens, and so are the loss and gradient for 1, 2 or 4 micro-batches."""
    tokenizer = build_tokenizer()
    batch, results = None, []
    for micro_batch_size in (12, 6, 3):
        trainer = tiny_trainer(tmp_path / str(micro_batch_size), tokenizer=tokenizer, loss_type=loss_type,
                               entropy_coef=0.1, max_grad_norm=0, micro_batch_size=micro_batch_size)
        if batch is None:
            batch, _ = trainer.make_batch()
            batch.advantages = torch.zeros(len(batch))
            assert len(batch) == 12
            assert batch.completion_mask[:6].sum() != batch.completion_mask[6:].sum(), "want uneven micro-batches"
        results.append(trainer.update(batch))
    first, *others = results
    assert first["loss"] == pytest.approx(-0.1 * first["entropy"], rel=1e-5) and first["grad_norm"] > 0
    for metrics in others:
        assert metrics["loss"] == pytest.approx(first["loss"], rel=1e-5)
        assert metrics["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-4)


def test_verl_token_mean_aggregation_is_dapo_and_vespo_trains(tmp_path):
    """loss_agg_mode gets the generation batch's counts: verl's token-mean over the clip loss is DAPO's
    global token mean, micro-batching and all; a successor loss type (VESPO) runs through the trainer."""
    tokenizer = build_tokenizer()
    batch, results = None, {}
    for name, options in [("dapo", dict(loss_type="dapo")), ("verl", dict(loss_type="grpo", loss_agg_mode="token-mean")),
                          ("vespo", dict(loss_type="vespo"))]:
        trainer = tiny_trainer(tmp_path / name, tokenizer=tokenizer, micro_batch_size=5, **options)
        if batch is None:
            batch = _fixed_batch(trainer)
        results[name] = (trainer.update(batch), params_of(trainer))
    (dapo, dapo_params), (verl, verl_params), (vespo, _) = results.values()
    assert verl["loss"] == pytest.approx(dapo["loss"], rel=1e-5) and verl["grad_norm"] == pytest.approx(dapo["grad_norm"], rel=1e-5)
    for key, value in dapo_params.items():
        torch.testing.assert_close(verl_params[key], value)
    assert vespo["skipped_updates"] == 0 and math.isfinite(vespo["loss"]) and "vespo/phi_seq_mean" in vespo


# --- rewards from the config -----------------------------------------------------------------


def test_answer_column_is_the_answer_the_builtin_rewards_read(tmp_path):
    rows = [{"question": f"{a}+{a}=", "solution": f"so #### {2 * a}"} for a in range(5)]
    trainer = tiny_trainer(tmp_path, rows=rows, reward_funcs=None, prompt_column="question", answer_column="solution")
    ids = torch.tensor([[5, 1]])
    rollout = Rollout(ids, torch.ones_like(ids), ids, torch.ones_like(ids), ["1+1="], ["<answer>2</answer>"], [rows[1]])
    assert trainer.score(rollout)[0].tolist() == pytest.approx([2.0, 0.4])  # gsm8k_answer, gsm8k_format (the defaults)
    with pytest.raises(ValueError, match=r"answer_column='answer', but row 0 of the dataset has no such column"):
        tiny_trainer(tmp_path, rows=rows, reward_funcs=None, prompt_column="question")


# --- robustness and bookkeeping -------------------------------------------------------------


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_step_is_skipped_and_logged(tmp_path, monkeypatch, poison):
    trainer = tiny_trainer(tmp_path, max_steps=3)
    real_loss = gk.fused_linear_grpo_loss

    def poisoned(hidden, *args, **kwargs):
        if trainer.step == 1 and poison == "gradient":
            hidden.register_hook(lambda grad: grad * float("inf"))
        loss, metrics = real_loss(hidden, *args, **kwargs)
        return (loss * float("nan") if trainer.step == 1 and poison == "loss" else loss), metrics

    monkeypatch.setattr(gk, "fused_linear_grpo_loss", poisoned)
    snapshots, log = [], trainer.log
    monkeypatch.setattr(trainer, "log", lambda metrics: (snapshots.append(params_of(trainer)), log(metrics)))
    history = trainer.train()
    assert [r["skipped_updates"] for r in history] == [0, 1, 0]
    assert history[1]["lr"] == history[0]["lr"]
    for name, value in snapshots[1].items():  # step 2 applied nothing, step 3 did
        assert torch.equal(value, snapshots[0][name]), name
    assert any(not torch.equal(v, snapshots[1][k]) for k, v in snapshots[2].items())
    assert all(torch.isfinite(v).all() for v in snapshots[2].values())
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped_updates"] for r in logged] == [0, 1, 0]


def test_a_batch_no_reward_scored_is_skipped_loudly(tmp_path):
    """Every reward None/NaN: no update (every advantage is 0), a RuntimeWarning, and the metric."""
    calls = []

    def flaky(prompts, completions, answer, **columns):
        calls.append(1)
        if len(calls) == 2:
            return [None] * (len(completions) - 1) + [float("nan")]
        return addition_reward(prompts, completions, answer)

    trainer = tiny_trainer(tmp_path, reward_funcs=[flaky], max_steps=3)
    snapshots, log = [], trainer.log
    trainer.log = lambda metrics: (snapshots.append(params_of(trainer)), log(metrics))
    with pytest.warns(RuntimeWarning, match=r"step 2: every reward function returned None or NaN .*\(flaky\)"):
        history = trainer.train()
    assert [r["frac_unscored"] for r in history] == [0.0, 1.0, 0.0]
    assert [r["skipped_updates"] for r in history] == [0, 1, 0]
    for name, value in snapshots[1].items():
        assert torch.equal(value, snapshots[0][name]), name


class _Preempted(RuntimeError):
    pass


def _reward_failing_on_call(n):
    calls = []

    def addition(prompts, completions, answer, **columns):
        calls.append(1)
        if len(calls) == n:
            raise _Preempted("simulated crash")
        return addition_reward(prompts, completions, answer)

    return addition


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    options = dict(max_steps=4, save_every=2, num_iterations=2, beta=0.05, lr_schedule="cosine", warmup_steps=1,
                   micro_batch_size=4)
    full = tiny_trainer(tmp_path / "full", reward_funcs=[_reward_failing_on_call(-1)], **options)
    full_history = full.train()
    cut = tiny_trainer(tmp_path / "cut", reward_funcs=[_reward_failing_on_call(3)], **options)
    with pytest.raises(_Preempted):
        cut.train()  # dies while scoring step 3, after checkpoint-2 was written
    assert open(tmp_path / "cut" / "latest").read() == "checkpoint-2"
    assert not any(p.endswith(".tmp") for p in os.listdir(tmp_path / "cut"))
    resumed = tiny_trainer(tmp_path / "cut", reward_funcs=[_reward_failing_on_call(-1)], resume=True, **options)
    assert resumed.step == 2
    resumed_history = resumed.train()
    keys = ("loss", "loss_last_iteration", "reward", "kl", "grad_norm", "lr")
    assert [[r[k] for k in keys] for r in resumed_history] == [[r[k] for k in keys] for r in full_history]
    for name, value in params_of(resumed).items():
        assert torch.equal(value, params_of(full)[name]), name
    logged = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4]


def test_resume_with_only_a_dangling_latest_starts_over(tmp_path, capsys):
    """`latest` is not what resume trusts: naming a checkpoint that does not exist, with no checkpoint
    directory at all, there is nothing to continue from (the metrics are of steps no checkpoint kept)."""
    (tmp_path / "latest").write_text("checkpoint-7")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    trainer = tiny_trainer(tmp_path, resume=True)
    assert trainer.step == 0 and "no checkpoint in" in capsys.readouterr().out
    assert not (tmp_path / "metrics.jsonl").exists()


def _parity_reward(prompts, completions, answer, **columns):
    """Flat (0.5) for even answers; for odd ones, the parity of the completion length."""
    return [0.5 if int(a) % 2 == 0 else float(len(c) % 2) for c, a in zip(completions, answer)]


def test_dynamic_sampling_refills_with_informative_groups(tmp_path):
    rows = [{"prompt": f"{a}+0=", "answer": str(a)} for a in range(9)]
    trainer = tiny_trainer(tmp_path, rows=rows, reward_funcs=[_parity_reward], dynamic_sampling=True,
                           max_sampling_rounds=8, prompts_per_step=2, max_new_tokens=6)
    for _ in range(3):
        batch, metrics = trainer.make_batch()
        assert len(batch) == 2 * 4
        if metrics["sampling_rounds"] < 8:
            assert metrics["frac_reward_zero_std"] == 0.0
            assert all(int(row["answer"]) % 2 == 1 for row in batch.rows)
            assert batch.rewards.view(2, 4).std(1).min() > 0
    assert trainer.sampler.state_dict()["position"] + 9 * trainer.sampler.state_dict()["epoch"] > 6


def test_gfpo_keeps_the_shortest_completions(tmp_path):
    trainer = tiny_trainer(tmp_path, reward_funcs=[lambda prompts, completions, **c: [float(len(x)) for x in completions]],
                           gfpo_keep=2, num_generations=4, prompts_per_step=4, max_new_tokens=6, temperature=1.5)
    batch, _ = trainer.make_batch()
    lengths = batch.completion_lengths.view(4, 4)
    kept = (batch.advantages != 0).view(4, 4)
    assert kept.sum(1).max() <= 2 and kept.any()
    for group_lengths, group_kept in zip(lengths, kept):
        if group_kept.any() and (~group_kept).any():
            assert group_lengths[group_kept].max() <= group_lengths[~group_kept].min()


def test_lora_reference_is_the_base_model_with_adapters_off(tmp_path):
    pytest.importorskip("peft")
    tokenizer = build_tokenizer()
    trainer = tiny_trainer(tmp_path, tokenizer=tokenizer, lora_r=4, lora_target_modules=["q_proj", "v_proj"],
                           beta=0.1, learning_rate=0.05)
    assert trainer.reference is None
    batch = _fixed_batch(trainer)
    trainer.update(batch)
    base = PolicyHead(build_model(tokenizer, hidden_size=32, seed=0))
    base_logprobs = trainer.logprobs(base, batch)
    torch.testing.assert_close(trainer.reference_logprobs(batch), base_logprobs)
    assert (trainer.logprobs(trainer.policy, batch) - base_logprobs).abs().max() > 1e-4  # LoRA trained
    trainer.save_model(str(tmp_path / "final"))  # the adapter, loadable onto the base model
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(build_model(tokenizer, hidden_size=32, seed=0), tmp_path / "final")
    torch.testing.assert_close(trainer.logprobs(PolicyHead(reloaded), batch), trainer.logprobs(trainer.policy, batch))


# --- the command line and the demo ------------------------------------------------------------


def test_offline_command_line_example(tmp_path, monkeypatch, capsys):
    """The README's offline CLI example, as written (demo --export, then examples/grpo_tiny_offline.yaml),
    with more reward functions and features switched on, in a subprocess with the hub switched off."""
    from grpo_kernels import demo
    from grpo_kernels.train.__main__ import main

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(tmp_path)  # the example's paths are relative to where it runs
    demo.main(["--export", "runs/tiny"])
    with open("runs/tiny/data.jsonl") as f:
        assert json.loads(f.readline()) == {"prompt": "0+0=", "answer": "0"}
    example = os.path.join(repo, "examples", "grpo_tiny_offline.yaml")
    overrides = ["--max_steps", "2", "--save_every", "1", "--prompts_per_step", "2", "--num_generations", "3",
                 "--max_new_tokens", "5", "--overlong_buffer", "2", "--micro_batch_size", "4", "--beta", "0.02",
                 "--gradient_checkpointing", "--attn_implementation", "eager", "--reward_funcs",
                 "grpo_kernels.demo:addition_reward", "gsm8k_answer", "overlong_penalty", "length",
                 "--reward_weights", "1.0", "1.0", "0.5", "0.1"]
    result = subprocess.run([sys.executable, "-m", "grpo_kernels.train", "--config", example, *overrides],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=repo))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "runs" / "tiny" / "train"
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "reward", "kl", "entropy", "clip_ratio/region_mean", "completion_length", "frac_unscored",
                "rewards/overlong_penalty", "rewards/gsm8k_answer", "frac_reward_zero_std", "grad_norm", "lr"):
        assert key in records[-1], key
    assert (out / "metrics.png").stat().st_size > 0
    assert open(out / "latest").read() == "checkpoint-2" and (out / "checkpoint-2" / "manifest.json").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")
    main(["--config", example, "--max_steps", "1", "--prompts_per_step", "2", "--num_generations", "2",
          "--micro_batch_size", "4", "--output_dir", "runs/one", "--no_save_final_model", "--no_progress_bar"])
    assert "done: 1 step, reward" in capsys.readouterr().out  # not "1 steps"
    # user errors on the same command line: one line on stderr, exit status 2, no traceback
    small_tokenizer = demo.build_tokenizer()
    demo.build_model(small_tokenizer, hidden_size=32).save_pretrained("runs/small")
    small_tokenizer.save_pretrained("runs/small")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": "2+2=", }\n')
    for argv, message in [
        (["--dataset", "bad.jsonl", "--output_dir", "runs/fresh"], "bad.jsonl, line 2: not valid JSON"),
        (["--max_steps", "2"], "holds another run (checkpoint-1, checkpoint-2, latest, metrics.jsonl, run.json)"),
        (["--learning_rat", "1e-3"], "unknown option --learning_rat (did you mean 'learning_rate'?)"),
        (["--beta", "-0.1"], "beta must be >= 0"),
        (["--model", "./no/such/model"], "model ./no/such/model: no such directory"),
        # a path (its parent exists, or it has two slashes) is no hub repo id
        (["--model", "runs/tiny/no-model"], "model runs/tiny/no-model: no such directory"),
        (["--model", "no/such/model"], "model no/such/model: no such directory"),
        (["--tokenizer", "runs/no-tokenizer"], "tokenizer runs/no-tokenizer: no such directory"),
        # the data is read before the model loads (runs/tiny is no model: loading it would fail first)
        (["--model", "runs/tiny", "--dataset", "no/such.jsonl", "--output_dir", "runs/fresh"],
         "dataset no/such.jsonl: no such file"),
        (["--model", "runs/small", "--resume"], "checkpoint-2 holds another model than this one (resumed with "
                                                "another --model?)"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", example, *argv])
        err = capsys.readouterr().err  # (transformers' loading bars may come first)
        last = err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and last.startswith("grpo-kernels-train: error: ") and message in last, err
        assert "Traceback" not in err, err


def test_demo_smoke(tmp_path, monkeypatch, capsys):
    """The demo's plumbing on a smaller batch (its full run is measured, not tested: see the README);
    it writes what its docstring lists, and runs again over its own earlier output."""
    from grpo_kernels import demo

    monkeypatch.setitem(demo.TRAINING, "prompts_per_step", 4)
    monkeypatch.setitem(demo.TRAINING, "num_generations", 4)
    threads = torch.get_num_threads()
    for _ in range(2):
        summary = demo.main(["--steps", "2", "--output_dir", str(tmp_path), "--no_progress_bar"])
        assert summary["steps"] == 2 and 0.0 <= summary["reward_first"] <= 1.0
    out = capsys.readouterr().out
    assert "mean reward, first step: " in out and "last step: " in out and "1 steps" not in out, out
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "demo.json", "latest", "metrics.jsonl", "metrics.png", "run.json"]
    assert (tmp_path / "metrics.png").stat().st_size > 0 and torch.get_num_threads() == threads


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
        (["--steps", "two"], "argument --steps: invalid int value: 'two'"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--output_dir", "{run}"], "--output_dir {run} holds a run that is not the demo's (checkpoint-1, "
                                    "metrics.jsonl): pass another --output_dir, or delete that directory"),
        (["--output_dir", "{file}"], "--output_dir {file} is not a directory"),
    ],
)
def test_demo_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    """No traceback, and no flag the demo does not have (the trainer's --resume, --overwrite_output_dir,
    max_steps)."""
    from grpo_kernels import demo

    (tmp_path / "run" / "checkpoint-1").mkdir(parents=True)  # a trainer run
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "file").write_text("")
    paths = dict(run=tmp_path / "run", file=tmp_path / "file")
    with pytest.raises(SystemExit) as exit_info:
        demo.main([arg.format(**paths) for arg in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("python -m grpo_kernels.demo: error: ") and message.format(**paths) in err, err
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-1", "metrics.jsonl"]


def test_end_to_end_benchmark_smoke(tmp_path):
    """benchmarks/bench_e2e_step.py runs (tiny model, CPU) and writes its report."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_e2e_step", "--smoke", "--cpu", "--out", str(tmp_path)],
                            cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "e2e_step.json").read_text())
    assert [r["impl"] for r in report["records"]] == ["fused", "materialized"]
    assert all(r["status"] == "ok" for r in report["records"])
