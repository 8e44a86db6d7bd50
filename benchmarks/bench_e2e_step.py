"""End-to-end GRPO policy-update step: fused hidden-states-to-loss vs materialized logits.

    python -m benchmarks.bench_e2e_step                    # Qwen2.5-1.5B shape, G=8, T=1024, on the GPU
    python -m benchmarks.bench_e2e_step --no-max-length    # skip the longest-completion search
    python -m benchmarks.bench_e2e_step --smoke --out /tmp/e2e   # tiny model, runs on CPU

What one step is (the trainer's policy update for one micro-batch of G completions of one prompt):
the backbone forward over prompt + completion, the GRPO loss (dapo, beta 0.04 with reference
log-probs, old log-probs given, temperature 1), backward into every weight. The optimizer step is
left out: it is the same in both and only adds a constant.

- ``fused``: ``grpo_kernels.train``'s path: the backbone's last hidden states and the LM-head
  weight into ``fused_linear_grpo_loss``; no ``[G, T, V]`` tensor exists.
- ``materialized``: the same loop through the model's logits (``logits_to_keep`` = the completion
  positions, as TRL does), log-probs and entropy from them (TRL's ``selective_log_softmax`` and
  ``entropy_from_logits`` when trl is installed, else fp32 ``log_softmax``), then ``grpo_loss``.

Model: Qwen2.5-1.5B's shape (D 1536, 28 layers, 12/2 heads, FFN 8960, V 151936, tied embeddings),
random bf16 weights, SDPA attention (flash-attention 2 when installed), gradient checkpointing on
(as RL trainers run; ``--no-gradient-checkpointing`` to turn it off). Prompt 256 tokens,
completions of T tokens (lengths uniform in T/2..T, right-padded).

Reported: peak memory above the model/inputs and median time of the step at T, for both; the
longest T (multiple of ``--length-step``) that fits on the device for both; the ratios against
the targets (peak <= 60% of materialized, longest T >= 2x). Output in
``benchmarks/results/<gpu-name>/e2e_step.json`` and ``e2e_step.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import grpo_kernels as gk  # noqa: E402
from benchmarks.measure import device_slug, is_out_of_memory, measure, release_memory  # noqa: E402
from grpo_kernels.train.distributed import PolicyHead, enable_activation_checkpointing  # noqa: E402

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
LOSS_OPTIONS = dict(loss_type="dapo", beta=0.04, epsilon_low=0.2, epsilon_high=0.2, temperature=1.0)
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                  rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, tie_word_embeddings=True)


def build_model(shape: dict, device, dtype, max_positions: int, gradient_checkpointing: bool):
    from transformers import AutoModelForCausalLM, Qwen2Config

    attn = "flash_attention_2" if device.type == "cuda" and _has_flash_attn() else "sdpa"
    config = Qwen2Config(**shape, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    return model, attn


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def make_inputs(G: int, prompt_length: int, T: int, vocab: int, device, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_length), generator=generator).expand(G, -1)
    completion_ids = torch.randint(0, vocab, (G, T), generator=generator)
    lengths = torch.randint(T // 2, T + 1, (G,), generator=generator)
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    input_ids = torch.cat([prompt, completion_ids * completion_mask], 1)
    attention_mask = torch.cat([torch.ones_like(prompt), completion_mask], 1)
    logprob_like = -torch.rand(G, T, generator=generator) * 3
    return {
        "input_ids": input_ids[:, :-1].to(device),  # the last token predicts nothing
        "attention_mask": attention_mask[:, :-1].to(device),
        "completion_ids": completion_ids.to(device),
        "completion_mask": completion_mask.to(device),
        "advantages": torch.randn(G, generator=generator).to(device),
        "old_logprobs": logprob_like.to(device),
        "ref_logprobs": (logprob_like + 0.05 * torch.randn(G, T, generator=generator)).to(device),
        "prompt_length": prompt_length,
    }


def fused_step(policy: PolicyHead, inp: dict) -> torch.Tensor:
    hidden, weight, bias = policy(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
    hidden = hidden[:, inp["prompt_length"] - 1 :]  # hidden[:, j] predicts completion token j
    loss, _ = gk.fused_linear_grpo_loss(
        hidden, weight, inp["completion_ids"], inp["completion_mask"], inp["advantages"], bias=bias,
        old_logprobs=inp["old_logprobs"], ref_logprobs=inp["ref_logprobs"],
        num_items_in_batch=inp["completion_mask"].sum(), **LOSS_OPTIONS,
    )
    return loss


def _logprobs_and_entropy(logits: torch.Tensor, ids: torch.Tensor):
    try:
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax
    except ImportError:
        logp_all = logits.float().log_softmax(-1)
        logp = logp_all.gather(-1, ids[..., None]).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy
    with torch.no_grad():
        entropy = entropy_from_logits(logits)
    return selective_log_softmax(logits, ids), entropy


def materialized_step(model, inp: dict) -> torch.Tensor:
    T = inp["completion_ids"].shape[1]
    logits = model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], logits_to_keep=T,
                   use_cache=False).logits
    logits = logits / LOSS_OPTIONS["temperature"]
    logprobs, entropy = _logprobs_and_entropy(logits, inp["completion_ids"])
    options = {k: v for k, v in LOSS_OPTIONS.items() if k != "temperature"}
    loss, _ = gk.grpo_loss(
        logprobs, inp["completion_mask"], inp["advantages"], old_logprobs=inp["old_logprobs"],
        ref_logprobs=inp["ref_logprobs"], entropy=entropy, num_items_in_batch=inp["completion_mask"].sum(), **options,
    )
    return loss


def make_step(impl: str, model, policy: PolicyHead, inputs: list[dict]):
    forward = (lambda inp: fused_step(policy, inp)) if impl == "fused" else (lambda inp: materialized_step(model, inp))

    def step(i: int):
        loss = forward(inputs[i % len(inputs)])
        loss.backward()
        # Free the gradients after the step, not before it: each measured step then allocates
        # them (as a real update does) and its peak counts them, instead of their being
        # subtracted as "already allocated" memory.
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def fits(impl, model, policy, args, T, device) -> bool:
    inputs = [make_inputs(args.group_size, args.prompt_length, T, model.config.vocab_size, device, seed=T)]
    step = make_step(impl, model, policy, inputs)
    try:
        step(0)
        ok = True
    except Exception as exc:  # noqa: BLE001
        if not is_out_of_memory(exc):
            raise
        ok = False
    model.zero_grad(set_to_none=True)
    del inputs, step
    release_memory(device, collect=True)
    return ok


def longest_fitting_length(impl, model, policy, args, device) -> int:
    """Largest multiple of ``length_step`` that runs: doubling from T, then bisection."""
    low, high = 0, args.completion_length
    while fits(impl, model, policy, args, high, device):
        low, high = high, high * 2
        if high > args.max_length:
            return low
    while high - low > args.length_step:
        middle = (low + high) // 2 // args.length_step * args.length_step
        if middle in (low, high):
            break
        low, high = (middle, high) if fits(impl, model, policy, args, middle, device) else (low, middle)
    return low


def run(args, on_record=None) -> dict:
    """The benchmark; ``on_record(result)`` after every measurement (results so far)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("the end-to-end benchmark needs a CUDA GPU; on CPU run the smoke version: --smoke")
    if args.smoke:
        args.completion_length, args.prompt_length, args.group_size = 16, 8, 2
    shape = TINY if args.smoke else QWEN25_15B
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model, attn = build_model(shape, device, dtype, max(args.max_length * 2, 4096), not args.no_gradient_checkpointing)
    policy = PolicyHead(model)
    records = []

    def checkpoint():
        if on_record is not None:
            on_record(_result(args, device, dtype, attn, records))

    # Both timings first, then the longest-T searches (many OOM attempts): a run stopped by a
    # time cap keeps the timings.
    for impl in ("fused", "materialized"):
        inputs = [make_inputs(args.group_size, args.prompt_length, args.completion_length, shape["vocab_size"], device,
                              seed=s) for s in range(2)]
        m = measure(make_step(impl, model, policy, inputs), len(inputs), device, min_runs=args.min_runs, cpu_runs=1)
        record = {"impl": impl, "T": args.completion_length, "peak_mb": m.peak_mb, "ms_median": m.ms_median,
                  "ms_p20": m.ms_p20, "ms_p80": m.ms_p80, "status": m.status}
        records.append(record)
        print(f"[e2e] {impl}: {record}", flush=True)
        del inputs
        model.zero_grad(set_to_none=True)
        release_memory(device, collect=True)
        checkpoint()
    if device.type == "cuda" and not args.no_max_length:
        for record in records:
            record["max_T"] = longest_fitting_length(record["impl"], model, policy, args, device)
            print(f"[e2e] {record['impl']}: longest T that fits {record['max_T']}", flush=True)
            checkpoint()
    return _result(args, device, dtype, attn, records)


def _result(args, device, dtype, attn, records) -> dict:
    records = [dict(r) for r in records]
    by_impl = {r["impl"]: r for r in records}
    fused, materialized = by_impl.get("fused", {}), by_impl.get("materialized", {})
    summary = {}
    if fused.get("peak_mb") and materialized.get("peak_mb"):
        summary["peak_ratio"] = fused["peak_mb"] / materialized["peak_mb"]
        summary["peak_target_met"] = summary["peak_ratio"] <= 0.6
    if fused.get("ms_median") and materialized.get("ms_median"):
        summary["time_ratio"] = fused["ms_median"] / materialized["ms_median"]
    if fused.get("max_T") and materialized.get("max_T"):
        summary["max_T_ratio"] = fused["max_T"] / materialized["max_T"]
        summary["max_T_target_met"] = summary["max_T_ratio"] >= 2.0
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "model": "tiny-qwen2" if args.smoke else "qwen2.5-1.5b-shape (random weights)",
        "dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": attn,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "G": args.group_size,
        "prompt_length": args.prompt_length,
        "loss_options": LOSS_OPTIONS,
        "records": records,
        "summary": summary,
        "command": "python -m benchmarks.bench_e2e_step " + " ".join(args.argv),
    }


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "e2e_step.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# End-to-end GRPO update step ({result['model']}, G={result['G']}, {result['dtype']})",
        "",
        f"{result['device']}, {result['date']}, torch {result['torch']}, attention {result['attn_implementation']}, "
        f"gradient checkpointing {result['gradient_checkpointing']}. Command: `{result['command']}`",
        "",
        "| impl | T | peak MiB | median ms | longest T that fits | status |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        ms = "-" if r["ms_median"] is None else f"{r['ms_median']:.1f}"
        lines.append(f"| {r['impl']} | {r['T']} | {peak} | {ms} | {r.get('max_T', '-')} | {r['status']} |")
    lines += ["", "Summary (fused / materialized): " + ", ".join(f"{k} = {v}" for k, v in result["summary"].items())]
    (out_dir / "e2e_step.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=1024)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=65536, help="stop the longest-T search here")
    parser.add_argument("--length-step", type=int, default=512)
    parser.add_argument("--no-max-length", action="store_true", help="skip the longest-T search")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--min-runs", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU; writes to --out or a tmp dir")
    parser.add_argument("--cpu", action="store_true", help="with --smoke: stay on CPU even with a GPU")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.argv = argv
    on_gpu = torch.cuda.is_available() and not args.cpu and not args.smoke
    out_dir = args.out or (RESULTS_ROOT / device_slug(torch.device("cuda")) if on_gpu else Path(tempfile.mkdtemp(prefix="e2e-")))
    if not on_gpu and out_dir.resolve().is_relative_to(RESULTS_ROOT.resolve()):
        raise SystemExit(f"refusing to write smoke/CPU numbers under {RESULTS_ROOT} (GPU results only)")
    result = run(args, on_record=lambda partial: write(partial, out_dir))
    write(result, out_dir)
    print(f"[e2e] wrote {out_dir}/e2e_step.json and e2e_step.md; summary: {result['summary']}")
    return result


if __name__ == "__main__":
    main()
