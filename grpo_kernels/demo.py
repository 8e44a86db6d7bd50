"""GRPO end to end on a CPU (2 cores) in under a minute, with nothing to download.

    python -m grpo_kernels.demo [--steps N] [--output_dir runs/demo] [--device auto]
    python -m grpo_kernels.demo --export DIR   # the tiny model and data for the offline CLI example

- model: a tiny Qwen2-architecture causal LM (``Qwen2Config`` -> ``AutoModelForCausalLM.from_config``,
  random weights, tied embeddings);
- tokenizer: a real ``transformers`` tokenizer (``PreTrainedTokenizerFast`` over a character-level
  ``tokenizers`` WordLevel model), built in memory;
- task: prompts ``"a+b="`` with single digits a, b in 0..4; the reward is 1 when the completion's
  first character is the digit a+b, else 0. A random policy scores about 1/15 (15 tokens);
- training: the GRPO trainer of ``grpo_kernels.train`` with the fused hidden-states-to-loss kernel
  (on a GPU the Triton kernels, on a CPU its chunked PyTorch path).

Prints a summary and writes to the output directory: ``metrics.jsonl`` (one record per step),
``metrics.png`` (reward and KL per step), ``checkpoint-<steps>/`` (the trainer's final,
resumable checkpoint) with the ``latest`` file naming it, ``run.json`` (the run's id) and
``demo.json`` (the summary). A directory holding an earlier demo run (its ``demo.json``) is
overwritten; a directory holding any other run is left alone: the demo refuses it (one line,
exit status 2), as it refuses ``--steps`` below 1.

``--export DIR`` writes ``DIR/model/`` (the tiny Qwen2 with random weights and its tokenizer,
``from_pretrained``-loadable) and ``DIR/data.jsonl`` (the 25 addition prompts with their answers)
and exits: ``grpo-kernels-train --config examples/grpo_tiny_offline.yaml`` trains on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

VOCAB = ["<pad>", "<eos>", "<unk>", *"0123456789", "+", "="]
MAX_OPERAND = 4
STEPS = 50
# the demo's training options (GRPOConfig fields): every prompt in every step, 32 samples each, so
# that each prompt sees its right answer early (with 16, one prompt of 25 can lock onto a wrong one)
TRAINING = dict(
    prompts_per_step=25,
    num_generations=32,
    max_new_tokens=1,  # the reward reads the first character only
    temperature=1.0,
    loss_type="dapo",
    beta=0.001,
    learning_rate=6e-3,
    lr_schedule="cosine",
    min_lr_ratio=0.1,
    warmup_steps=3,
    max_grad_norm=1.0,
    micro_batch_size=800,
)


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over :data:`VOCAB`, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(tokenizer, *, hidden_size=64, layers=2, attn_implementation="sdpa", seed=0):
    """A tiny Qwen2 with random weights (the same ones for a given seed)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def addition_rows() -> list[dict]:
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def addition_reward(prompts, completions, answer, **columns) -> list[float]:
    """1.0 when the completion starts with the right sum, else 0.0."""
    return [float(completion[:1] == expected) for completion, expected in zip(completions, answer)]


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows, device) -> float:
    """Share of prompts whose greedy first token is the right sum."""
    encoded = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    hidden = model.base_model(input_ids=encoded["input_ids"].to(device)).last_hidden_state[:, -1]
    first = (hidden @ model.get_output_embeddings().weight.T).argmax(-1)
    predicted = tokenizer.batch_decode(first[:, None].tolist())
    return sum(p == r["answer"] for p, r in zip(predicted, rows)) / len(rows)


def export(directory: str, seed: int = 0) -> None:
    """``directory/model`` (tiny Qwen2 + tokenizer, ``from_pretrained``-loadable) and ``directory/data.jsonl``."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    model.save_pretrained(os.path.join(directory, "model"))
    tokenizer.save_pretrained(os.path.join(directory, "model"))
    with open(os.path.join(directory, "data.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in addition_rows())
    print(f"wrote {os.path.join(directory, 'model')}/ and {os.path.join(directory, 'data.jsonl')}")


PROG = "python -m grpo_kernels.demo"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A user error: one line on stderr and exit status 2 (argparse would print the usage first)."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _check_output_dir(parser: argparse.ArgumentParser, directory: str) -> None:
    """Refuses (one line, exit 2) an --output_dir that is a file, or that holds a run that is not an
    earlier demo's (no demo.json): the demo overwrites only its own output."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        parser.error(f"--output_dir {directory} is not a directory")
    if not os.path.isdir(directory) or os.path.isfile(os.path.join(directory, "demo.json")):
        return
    from grpo_kernels.train.checkpoint import RUN_FILE, checkpoint_name

    found = sorted(name for name in os.listdir(directory)
                   if checkpoint_name(name) or name in ("latest", "metrics.jsonl", RUN_FILE))
    if found:
        parser.error(f"--output_dir {directory} holds a run that is not the demo's ({', '.join(found)}): pass another "
                     "--output_dir, or delete that directory")


def main(argv=None) -> dict:
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=_positive_int, default=STEPS, help="training steps (generation batches), >= 1")
    parser.add_argument("--output_dir", default="runs/demo", help="where the demo's outputs go")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_progress_bar", action="store_true")
    parser.add_argument("--export", metavar="DIR", help="write the tiny model and dataset to DIR and exit")
    args = parser.parse_args(argv)
    if args.export:
        export(args.export, args.seed)
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    _check_output_dir(parser, args.output_dir)
    threads = torch.get_num_threads()
    if args.device == "cpu" or not torch.cuda.is_available():
        # a 75k-parameter model's matmuls are too small to split: a second thread only adds a
        # barrier per op, which costs several times the work on a busy machine
        torch.set_num_threads(1)
    try:
        return _train(args, parser)
    finally:
        torch.set_num_threads(threads)


def _train(args, parser) -> dict:
    from grpo_kernels.train import GRPOConfig, GRPOTrainer
    from grpo_kernels.train.checkpoint import CheckpointError
    from grpo_kernels.train.config import ConfigError

    started = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=args.seed)
    rows = addition_rows()
    config = GRPOConfig(
        **TRAINING,
        max_steps=args.steps,
        device=args.device,
        mode="single",
        seed=args.seed,
        output_dir=args.output_dir,
        # an earlier demo run in the directory is replaced; anything else makes the trainer refuse
        overwrite_output_dir=os.path.isfile(os.path.join(args.output_dir, "demo.json")),
        save_final_model=False,
        progress_bar=not args.no_progress_bar,
    )
    try:
        trainer = GRPOTrainer(config, model=model, tokenizer=tokenizer, dataset=rows, reward_funcs=[addition_reward])
    except (ConfigError, CheckpointError) as error:  # e.g. an output_dir that cannot be written to
        parser.error(str(error))
    accuracy_before = greedy_accuracy(model, tokenizer, rows, trainer.device)
    history = trainer.train()
    accuracy_after = greedy_accuracy(model, tokenizer, rows, trainer.device)
    trainer.close()

    window = max(1, min(10, len(history) // 4))
    first = sum(r["reward"] for r in history[:window]) / window
    last = sum(r["reward"] for r in history[-window:]) / window
    summary = {
        "steps": len(history),
        "device": str(trainer.device),
        "reward_first": first,
        "reward_last": last,
        "greedy_accuracy_before": accuracy_before,
        "greedy_accuracy_after": accuracy_after,
        "seconds": time.perf_counter() - started,
        "plot": os.path.join(args.output_dir, "metrics.png"),
    }
    with open(os.path.join(args.output_dir, "demo.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    steps = "step" if window == 1 else f"{window} steps"
    print(
        f"\nGRPO demo: tiny Qwen2 ({sum(p.numel() for p in model.parameters()) / 1e3:.0f}k params) learning "
        f"a+b (a, b <= {MAX_OPERAND}) on {summary['device']}, {summary['steps']} step{'s' * (summary['steps'] != 1)} "
        f"in {summary['seconds']:.0f} s (after imports)\n"
        f"  mean reward, first {steps}: {first:.3f}  ->  last {steps}: {last:.3f}\n"
        f"  greedy accuracy on all {len(rows)} prompts: {accuracy_before:.2f} -> {accuracy_after:.2f}\n"
        f"  plot: {summary['plot']}   metrics: {os.path.join(args.output_dir, 'metrics.jsonl')}"
    )
    return summary


if __name__ == "__main__":
    main()
