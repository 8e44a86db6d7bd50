"""The GRPO loop, readable top to bottom.

One step (one generation batch):

1. take ``prompts_per_step`` prompts (this rank's share), generate G completions each;
2. score them with the reward functions, gather the rewards from every rank, and turn them into
   group advantages (optionally GFPO-filtered; with DAPO dynamic sampling, groups whose rewards
   are all equal are dropped and more prompts are generated to refill the batch);
3. old log-probs (only when mu > 1) and reference log-probs (only when beta != 0) with the
   fused kernel's no-grad forward;
4. mu policy updates: micro-batches with gradient accumulation, the loss from the backbone's last
   hidden states and the LM-head weight through ``fused_linear_grpo_loss`` (the [B, T, V] logits
   never exist), the global token count as ``num_items_in_batch``, clipping, AdamW, LR schedule.
   A step whose loss or gradient norm is not finite is skipped and logged.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import tempfile
import time
import uuid
import warnings
from collections import defaultdict
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

import grpo_kernels as gk
from grpo_kernels.ops.grpo_loss import LOSS_TYPES_TABLE
from grpo_kernels.train.checkpoint import (
    RUN_FILE,
    CheckpointError,
    agree_on,
    checkpoint_dirs,
    checkpoint_name,
    find_resumable,
    load_checkpoint,
    read_run_file,
    save_checkpoint,
    write_run_file,
)
from grpo_kernels.train.config import ConfigError, GRPOConfig
from grpo_kernels.train.data import PromptSampler, load_rows
from grpo_kernels.train.distributed import (
    PolicyHead,
    all_gather_rows,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    enable_activation_checkpointing,
    gathered_for_generation,
    generator_of,
    gradient_sync,
    head_grpo_loss,
    head_logprobs,
    init_distributed,
    release_gathered,
    unwrap_peft,
    wrap,
)
from grpo_kernels.train.rewards import build_reward_funcs, check_answer_column, score
from grpo_kernels.train.rollout import Rollout, eos_token_ids, generate

# loss types normalized by the token count of the whole generation batch (on all ranks)
TOKEN_NORMALIZED = tuple(name for name, spec in LOSS_TYPES_TABLE.items() if spec.aggregation == "trl:global-token-mean")


def resolve_attn_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    has_flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    return "flash_attention_2" if has_flash else "sdpa"


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` optimizer steps, then constant / linear / cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def set_parameter_dtypes(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Trainable parameters in float32 (master weights: AdamW on bfloat16 weights rounds small updates
    away), frozen ones in the compute dtype; buffers (e.g. rotary frequencies) keep their dtype."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.float32 if parameter.requires_grad else compute_dtype)


def _check_local_path(name: str, value: str) -> None:
    """FileNotFoundError for a ``model``/``tokenizer`` that is meant as a local directory but is none.

    Meant as local: it starts with ``/``, ``./``, ``../`` or ``~``, has two or more ``/`` (a hub
    repo id has at most one) or a backslash, or its parent directory exists here."""
    expanded = os.path.expanduser(value)
    parent = os.path.dirname(expanded.rstrip("/"))
    local = (value.startswith(("/", "./", "../", "~")) or value in (".", "..") or value.count("/") >= 2
             or "\\" in value or (parent != "" and os.path.isdir(parent)))
    if local and not os.path.isdir(expanded):
        raise FileNotFoundError(f"{name} {value}: no such directory" + (" (a file)" if os.path.exists(expanded) else ""))


def _check_writable(directory: str) -> None:
    """ConfigError unless ``directory`` exists (it is created) and a file can be created in it."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".grpo-kernels-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ConfigError(f"output_dir {directory} is not a directory") from None
        raise ConfigError(f"output_dir {directory} is not writable ({reason}): choose another --output_dir") from None


def _remove_all_or_nothing(directory: str, names: list[str]) -> list[tuple[str, str]]:
    """Deletes the entries ``names`` of ``directory``, all or none; returns the symbolic links among
    them as (name, target). Each is first renamed into a fresh hidden directory of ``directory``
    (a rename moves a link, never follows it); if one cannot be moved, the ones already moved go
    back and a ConfigError says so. Only then is that directory deleted."""
    trash = tempfile.mkdtemp(dir=directory, prefix=".grpo-kernels-overwritten-")
    links, moved = [], []
    try:
        for name in names:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                links.append((name, os.readlink(path)))
            os.rename(path, os.path.join(trash, name))
            moved.append(name)
    except OSError as error:
        for name in reversed(moved):
            os.rename(os.path.join(trash, name), os.path.join(directory, name))
        os.rmdir(trash)
        raise ConfigError(f"overwrite_output_dir: cannot remove {os.path.join(directory, name)} "
                          f"({error.strerror or error}): nothing was deleted") from None
    shutil.rmtree(trash)  # rmtree removes links inside the tree without following them
    return links


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class GRPOTrainer:
    """GRPO on any Hugging Face causal LM with the fused loss; see the module docstring.

    ``model``, ``tokenizer``, ``dataset`` (rows, a ``datasets.Dataset`` or a path) and
    ``reward_funcs`` (callables) override what ``config`` would load by name.
    """

    def __init__(self, config: GRPOConfig, *, model=None, tokenizer=None, dataset=None, reward_funcs=None):
        self.config = cfg = dataclasses.replace(config)  # a copy, validated again: fields may have been set since
        if model is None and not cfg.model:
            raise ConfigError("no model given: set `model` (--model) to a Hugging Face model id or a local directory")
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but torch sees no CUDA device (torch.cuda.is_available() is False)")
        if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ImportError("tensorboard=true needs the tensorboard package: pip install tensorboard")
        if model is None:
            _check_local_path("model", cfg.model)
        if tokenizer is None and cfg.tokenizer:
            _check_local_path("tokenizer", cfg.tokenizer)
        self.dist = init_distributed(cfg.mode, cfg.device)
        self.device, self.rank, self.world_size = self.dist.device, self.dist.rank, self.dist.world_size
        if cfg.prompts_per_step % self.world_size:
            raise ValueError(f"prompts_per_step={cfg.prompts_per_step} is not divisible by world size {self.world_size}")
        # --- the output directory and the data, checked before any model loads -------------------
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        plan = self._check_output_dir()  # nothing deleted yet: that waits until everything has loaded
        self.rows = load_rows(cfg.dataset if dataset is None else dataset, cfg.prompt_column, cfg.dataset_split,
                              cfg.dataset_config)
        self.sampler = PromptSampler(len(self.rows), cfg.seed)
        if reward_funcs is None:
            check_answer_column(cfg, self.rows)
        self.reward_funcs = build_reward_funcs(cfg) if reward_funcs is None else list(reward_funcs)
        if cfg.reward_weights is not None and len(cfg.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{len(cfg.reward_weights)} reward_weights for {len(self.reward_funcs)} reward functions")
        self.reward_names = (
            [name.rpartition(":")[2] for name in cfg.reward_funcs]  # the names the config used
            if reward_funcs is None
            else [getattr(f, "__name__", f"reward_{k}") for k, f in enumerate(self.reward_funcs)]
        )
        self.reward_weights = torch.tensor(cfg.reward_weights or [1.0] * len(self.reward_funcs), device=self.device)
        seed_everything(cfg.seed)  # the same initial weights on every rank

        # --- model, tokenizer, reference ---------------------------------------------------------
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
        tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        compute_dtype = getattr(torch, cfg.dtype)
        if model is None:
            # trained weights are float32 masters; a LoRA base is frozen and stored in the compute dtype
            model = AutoModelForCausalLM.from_pretrained(
                cfg.model, dtype=torch.float32 if cfg.lora_r == 0 else compute_dtype,
                attn_implementation=resolve_attn_implementation(cfg.attn_implementation),
            )
        elif cfg.attn_implementation != "auto":
            model.set_attn_implementation(cfg.attn_implementation)
        for module in model.modules():  # RL needs the sampling policy and the trained one to agree
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.to(self.device)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        attn = model.config._attn_implementation
        self.packing = attn == "flash_attention_2" if cfg.packing == "auto" else cfg.packing in (True, "true")
        self.reference = None
        if cfg.beta != 0 and cfg.lora_r == 0:
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
            set_parameter_dtypes(frozen, compute_dtype)
            self.reference = wrap(PolicyHead(frozen, compute_dtype), self.dist, trainable=False)
        if cfg.lora_r > 0:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise ImportError("lora_r > 0 needs peft: pip install 'grpo-kernels[train]' (or pip install peft)") from None

            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
            model = get_peft_model(model, lora)
        set_parameter_dtypes(model, compute_dtype)
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(unwrap_peft(model))
        self.model = model  # the unwrapped model: generation config, saving
        self.policy = wrap(PolicyHead(model, compute_dtype), self.dist)
        self.policy.train()

        # --- optimization ------------------------------------------------------------------------
        self.trainable_parameters = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable_parameters, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
        )
        schedule = partial(
            lr_factor,
            warmup=cfg.warmup_steps,
            total=cfg.max_steps * cfg.num_iterations,
            schedule=cfg.lr_schedule,
            min_ratio=cfg.min_lr_ratio,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.loss_options = cfg.loss_options()  # validated with the config

        # --- bookkeeping -------------------------------------------------------------------------
        self.step, self.history = 0, []
        self._on_main(self._claim_output_dir, plan)  # overwrite_output_dir deletes only now
        if plan["resume_from"] is not None:
            self._resume(plan["resume_from"])
        else:
            # a fresh run: its own id (or the directory's, resuming with no checkpoint left), so that
            # pruning never touches another run's checkpoints
            self.run_id = plan["run_id"] or agree_on(uuid.uuid4().hex)
            seed_everything(cfg.seed + 1 + self.rank)  # each rank samples its own completions
        # output_dir/run.json names the directory's run; written with the run's first record or
        # checkpoint (a trainer that is built but never steps leaves nothing behind)
        self._run_file_written = plan["run_id"] == self.run_id
        self.tensorboard = self._tensorboard() if cfg.tensorboard and self.dist.is_main else None

    def _on_main(self, function, *args):
        """``function(*args)`` on rank 0; its result, or its user error, on every rank."""
        verdict = None
        if self.dist.is_main:
            try:
                verdict = ("ok", function(*args))
            except (CheckpointError, ConfigError) as error:
                verdict = (type(error).__name__, str(error))
        kind, value = agree_on(verdict)
        if kind != "ok":
            raise (CheckpointError if kind == "CheckpointError" else ConfigError)(value)
        return value

    def _check_output_dir(self) -> dict:
        """What to do with ``output_dir``, decided on rank 0 before any model loads, with no side
        effect but creating the directory: ``resume_from`` (a checkpoint or None), ``run_id`` (the
        directory's run, from its run.json) and ``delete`` (what overwrite_output_dir will delete).

        Refuses an output_dir that cannot be written to, trainer files (``latest``, ``metrics.jsonl``,
        ``run.json``, ``checkpoint-*``) of the wrong kind, and, for a fresh run, an output_dir that
        holds another run unless ``overwrite_output_dir``. ``resume`` takes the newest intact
        checkpoint of the directory's run and refuses when there are checkpoints but none is intact."""
        return self._on_main(self._inspect_output_dir)

    def _inspect_output_dir(self) -> dict:
        cfg = self.config
        directory = cfg.output_dir
        _check_writable(directory)
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if name in ("latest", "metrics.jsonl", RUN_FILE):
                if os.path.islink(path) or not os.path.isfile(path):
                    kind = "a symbolic link" if os.path.islink(path) else "a directory" if os.path.isdir(path) else "no regular file"
                    raise ConfigError(f"{path} is {kind}, not the trainer's `{name}` file: move it away (the trainer "
                                      "writes that file and never deletes what it did not write)")
            elif checkpoint_name(name) and not os.path.isdir(path):
                raise ConfigError(f"{path} is no checkpoint directory (a file or a dangling link): move it away")
        plan = {"resume_from": None, "run_id": read_run_file(directory), "delete": [], "drop_metrics": False}
        if cfg.resume:
            plan["resume_from"], _ = find_resumable(directory, run_id=plan["run_id"])
            if plan["resume_from"] is None:
                print(f"resume: no checkpoint in {directory}, starting from scratch")
                plan["drop_metrics"] = os.path.exists(self.metrics_path)
            return plan
        previous = [os.path.basename(c.path) for c in checkpoint_dirs(directory)]
        previous += [name for name in ("latest", "metrics.jsonl", RUN_FILE) if os.path.lexists(os.path.join(directory, name))]
        if previous and not cfg.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {directory} holds another run ({', '.join(sorted(previous))}): continue it with "
                "--resume, or delete it and start afresh with --overwrite_output_dir"
            )
        plan["delete"], plan["run_id"] = sorted(previous), None
        return plan

    def _claim_output_dir(self, plan: dict) -> None:
        """Carries out the plan of :meth:`_check_output_dir` (rank 0), once everything has loaded."""
        directory = self.config.output_dir
        if plan["drop_metrics"]:  # every record is past the last checkpoint (none)
            print(f"resume: {self.metrics_path} holds only steps no checkpoint kept, dropped")
            os.remove(self.metrics_path)
        if plan["delete"]:
            links = _remove_all_or_nothing(directory, plan["delete"])
            notes = [f"{name} (a symbolic link: removed the link, not its target {target})" for name, target in links]
            kept = [name for name in plan["delete"] if name not in dict(links)]
            print(f"overwrite_output_dir: deleted {', '.join(kept + notes)} from {directory}")

    # =============================================================================================
    # The loop
    # =============================================================================================

    def train(self) -> list[dict]:
        cfg = self.config
        progress = tqdm(
            total=cfg.max_steps, initial=self.step, desc="GRPO", dynamic_ncols=True,
            disable=not (cfg.progress_bar and self.dist.is_main),
        )
        while self.step < cfg.max_steps:
            started = time.perf_counter()
            batch, metrics = self.make_batch()
            if metrics["frac_unscored"] == 1.0:
                # every advantage is 0: an update would only follow the KL term, which is no training
                # on this data; say so where it cannot be missed
                message = (f"step {self.step + 1}: every reward function returned None or NaN for every completion "
                           f"({', '.join(self.reward_names)}): update skipped")
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                progress.write(message)
                metrics.update(loss=math.nan, grad_norm=math.nan, skipped_updates=cfg.num_iterations)
            else:
                metrics.update(self.update(batch))
            self.step += 1
            metrics.update(step=self.step, lr=self.scheduler.get_last_lr()[0], step_time=time.perf_counter() - started)
            self.log(metrics)
            progress.set_postfix_str(
                f"reward={metrics['reward']:.3f} kl={metrics.get('kl', 0.0):.4f} "
                f"clip={metrics.get('clip_ratio/region_mean', 0.0):.3f} entropy={metrics.get('entropy', 0.0):.3f} "
                f"len={metrics['completion_length']:.1f}"
            )
            progress.update()
            if metrics["skipped_updates"] and metrics["frac_unscored"] < 1.0:
                progress.write(f"step {self.step}: non-finite loss or gradient norm, update skipped")
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        progress.close()
        self.save_checkpoint()
        if cfg.save_final_model:
            self.save_model(os.path.join(cfg.output_dir, "final"))
        if self.dist.is_main:
            plot_metrics(self.history, os.path.join(cfg.output_dir, "metrics.png"))
        if self.tensorboard is not None:
            self.tensorboard.close()
        return self.history

    # =============================================================================================
    # 1-2. Rollouts, rewards, advantages
    # =============================================================================================

    def rollout(self, rows: list[dict]) -> Rollout:
        """G sampled completions per row (one ``generate`` call for this rank's prompts)."""
        self.policy.eval()  # lets generation use the KV cache under gradient checkpointing
        with gathered_for_generation(self.policy):
            rollout = generate(
                generator_of(self.policy), self.tokenizer, rows, self.config, self.eos_token_ids, self.device
            )
        self.policy.train()
        return rollout

    def score(self, rollout: Rollout) -> torch.Tensor:
        cfg = self.config
        columns = {key: [row.get(key) for row in rollout.rows] for key in rollout.rows[0] if key != cfg.prompt_column}
        if cfg.answer_column is not None:  # the built-in rewards read the reference as `answer`
            columns["answer"] = [row.get(cfg.answer_column) for row in rollout.rows]
        columns["completion_ids"] = [ids[: int(n)] for ids, n in zip(rollout.completion_ids.tolist(), rollout.completion_lengths.tolist())]
        columns["completion_lengths"] = rollout.completion_lengths.tolist()
        return score(self.reward_funcs, rollout.prompts, rollout.completions, columns)

    def make_batch(self) -> tuple[Rollout, dict]:
        """This rank's scored rollout with advantages, and the batch's metrics (over all ranks)."""
        cfg, G = self.config, self.config.num_generations
        prompts_per_rank = cfg.prompts_per_step // self.world_size
        groups, zero_std_groups, rounds = [], [], 0
        while True:
            rounds += 1
            indices = self.sampler.next_batch(cfg.prompts_per_step)
            indices = indices[self.rank * prompts_per_rank : (self.rank + 1) * prompts_per_rank]
            rollout = self.rollout([self.rows[i] for i in indices])
            rollout.rewards = self.score(rollout)
            if not cfg.dynamic_sampling:
                groups = [rollout]
                break
            # DAPO dynamic sampling: a group whose rewards are all equal has no gradient signal
            zero_std = gk.group_advantages(rollout.rewards.to(self.device), G, reward_weights=self.reward_weights).zero_std
            for p, flat in enumerate(zero_std.tolist()):
                (zero_std_groups if flat else groups).append(rollout.select(list(range(p * G, (p + 1) * G))))
            enough = all_reduce_min(len(groups), self.device) >= prompts_per_rank
            if enough or rounds == cfg.max_sampling_rounds:
                break
        # when refilling gave up, flat groups make up the rest (advantage 0, KL still counts)
        batch = Rollout.concat((groups + zero_std_groups)[:prompts_per_rank])

        lengths = batch.completion_lengths.float()
        gathered = all_gather_rows(torch.cat([batch.rewards.to(self.device), lengths[:, None]], 1))
        rewards, all_lengths = gathered[:, :-1], gathered[:, -1]
        total_reward = torch.nansum(rewards * self.reward_weights, 1)
        keep_mask = None
        if cfg.gfpo_keep is not None:
            gfpo_score = -all_lengths if cfg.gfpo_metric == "length" else total_reward / all_lengths.clamp(min=1)
            keep_mask = gk.gfpo_keep_mask(gfpo_score, G, cfg.gfpo_keep)
        advantages = gk.group_advantages(
            rewards, G, scale=cfg.scale_rewards, reward_weights=self.reward_weights, keep_mask=keep_mask
        )
        local = slice(self.rank * len(batch), (self.rank + 1) * len(batch))
        batch.advantages = advantages.advantages[local].float()

        scored = ~rewards.isnan().all(1)
        metrics = {
            "reward": total_reward[scored].mean().item() if scored.any() else math.nan,
            "reward_std": total_reward[scored].std().item() if scored.sum() > 1 else 0.0,
            # completions no reward function scored (out of every advantage statistic, advantage 0)
            "frac_unscored": 1.0 - scored.float().mean().item(),
            "completion_length": all_lengths.mean().item(),
            "frac_reward_zero_std": advantages.zero_std.float().mean().item(),
            "sampling_rounds": rounds,
        }
        for name, column in zip(self.reward_names, rewards.T):
            metrics[f"rewards/{name}"] = column.nanmean().item()
        return batch, metrics

    # =============================================================================================
    # 3. Hidden states and no-grad log-probs
    # =============================================================================================

    def hidden_states(self, module, batch: Rollout, rows: slice):
        """Hidden states aligned with the completion tokens of ``rows``: ``hidden[:, j]`` predicts
        ``completion_ids[:, j]``. Padding columns that no row of the slice needs are cut off.

        Returns (hidden [b, C, D], lm_head_weight [V, D], bias, completion_ids [b, C], completion_mask [b, C]).
        """
        prompt_mask, completion_mask = batch.prompt_mask[rows], batch.completion_mask[rows]
        P, C = int(prompt_mask.sum(1).max()), int(completion_mask.sum(1).max())
        prompt_ids, prompt_mask = batch.prompt_ids[rows, -P:], prompt_mask[:, -P:]
        completion_ids, completion_mask = batch.completion_ids[rows, :C], completion_mask[:, :C]
        if self.packing:
            hidden, weight, bias = self._packed_forward(module, prompt_ids, prompt_mask, completion_ids, completion_mask)
        else:
            input_ids = torch.cat([prompt_ids, completion_ids], 1)[:, :-1]  # the last token predicts nothing
            attention_mask = torch.cat([prompt_mask, completion_mask], 1)[:, :-1]
            position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # as generate numbers left-padded rows
            hidden, weight, bias = module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            hidden = hidden[:, P - 1 :]  # position P-1+j holds the state that predicts completion token j
        return hidden, weight, bias, completion_ids, completion_mask

    @staticmethod
    def _packed_forward(module, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """All sequences of the micro-batch back to back in one row, no padding; positions restart at
        0 per sequence, which is how flash-attention's varlen path (and the SDPA/eager block-causal
        masks of transformers) tell them apart."""
        prompt_lengths, completion_lengths = prompt_mask.sum(1), completion_mask.sum(1)
        P = prompt_ids.shape[1]
        sequences = [
            torch.cat([ids[P - n_prompt :], completion[:n_completion]])
            for ids, completion, n_prompt, n_completion in zip(
                prompt_ids, completion_ids, prompt_lengths.tolist(), completion_lengths.tolist()
            )
        ]
        lengths = prompt_lengths + completion_lengths
        position_ids = torch.cat([torch.arange(len(s), device=prompt_ids.device) for s in sequences])
        hidden, weight, bias = module(input_ids=torch.cat(sequences)[None], position_ids=position_ids[None])
        starts = lengths.cumsum(0) - lengths
        index = starts[:, None] + prompt_lengths[:, None] - 1 + torch.arange(completion_ids.shape[1], device=starts.device)
        index = torch.where(completion_mask.bool(), index, starts[:, None])  # masked slots: any valid row
        return hidden[0, index], weight, bias

    def micro_batches(self, batch: Rollout) -> list[slice]:
        size = self.config.micro_batch_size
        return [slice(i, min(i + size, len(batch))) for i in range(0, len(batch), size)]

    @torch.no_grad()
    def logprobs(self, module, batch: Rollout) -> torch.Tensor:
        """Per-token log-probs ``[B, C]`` of the completions under ``module``, fused, no gradient."""
        out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=self.device)
        for rows in self.micro_batches(batch):
            hidden, weight, bias, ids, mask = self.hidden_states(module, batch, rows)
            targets = ids.masked_fill(mask == 0, -100)
            out[rows, : ids.shape[1]] = head_logprobs(
                hidden, weight, targets, bias=bias, temperature=self.config.temperature
            )
        return out

    def reference_logprobs(self, batch: Rollout) -> torch.Tensor:
        if self.reference is not None:
            logprobs = self.logprobs(self.reference, batch)
            release_gathered(self.reference)
            return logprobs
        with self.model.disable_adapter():  # LoRA: the base model is the reference
            return self.logprobs(self.policy, batch)

    # =============================================================================================
    # 4. Policy updates
    # =============================================================================================

    def update(self, batch: Rollout) -> dict:
        cfg = self.config
        token_normalized = cfg.loss_type in TOKEN_NORMALIZED
        global_tokens = int(all_reduce_sum(batch.completion_mask.sum()))
        # verl's aggregations (loss_agg_mode) take the counts of the whole generation batch and the
        # number of ranks, and so normalize globally like dapo: micro-batches are summed, not averaged
        verl_counts = {} if cfg.loss_agg_mode is None else dict(
            dp_size=self.world_size, batch_num_tokens=global_tokens, global_batch_size=len(batch) * self.world_size)
        globally_normalized = token_normalized or cfg.loss_agg_mode is not None
        old = self.logprobs(self.policy, batch) if cfg.num_iterations > 1 else None
        ref = self.reference_logprobs(batch) if cfg.beta != 0 else None
        micro_batches = self.micro_batches(batch)
        # dapo/cispo divide by num_items_in_batch / world_size already (TRL), so that DDP/FSDP's
        # gradient average over ranks yields sum / num_items_in_batch. Per-row means are weighted by
        # the micro-batch's share of the rank's rows (1/GA for even splits) and then averaged over
        # ranks the same way.
        shares = [1.0 if globally_normalized else (rows.stop - rows.start) / len(batch) for rows in micro_batches]
        # The kernel's entropy bonus is -coef x the micro-batch's mean entropy. Weighting it by the
        # micro-batch's share of all completion tokens (and undoing `share` and the rank average)
        # makes the step's bonus -entropy_coef x the mean over the generation batch's tokens,
        # whatever the micro-batching and the number of ranks.
        entropy_coefs = [
            cfg.entropy_coef * float(batch.completion_mask[rows].sum()) * self.world_size
            / (max(global_tokens, 1) * share)
            for rows, share in zip(micro_batches, shares)
        ]
        sums, skipped, grad_norms, losses = defaultdict(float), 0, [], []
        for _ in range(cfg.num_iterations):
            loss_sum = torch.zeros((), device=self.device)
            metric_sums = defaultdict(lambda: torch.zeros((), device=self.device))
            for j, (rows, share) in enumerate(zip(micro_batches, shares)):
                with gradient_sync(self.policy, enabled=j == len(micro_batches) - 1):
                    hidden, weight, bias, ids, mask = self.hidden_states(self.policy, batch, rows)
                    C = ids.shape[1]
                    # the fused loss, or under FSDP2 with an untied head the sharded-head layout
                    loss, metrics = head_grpo_loss(
                        hidden, weight, ids, mask, batch.advantages[rows],
                        bias=bias,
                        old_logprobs=None if old is None else old[rows, :C],
                        ref_logprobs=None if ref is None else ref[rows, :C],
                        num_items_in_batch=global_tokens if token_normalized else None,
                        entropy_coef=entropy_coefs[j],
                        **verl_counts,
                        **self.loss_options,
                    )
                    (loss * share).backward()
                loss_sum += loss.detach() * share
                tokens = mask.sum()
                for key, value in metrics.items():
                    if key != "kl" or ref is not None:  # no reference, no KL (the kernel reports NaN)
                        metric_sums[key] += value.detach().float() * tokens
                metric_sums["tokens"] += tokens
            # every rank reaches the same verdict: the loss is all-reduced, the grad norm is global
            loss_global = all_reduce_sum(loss_sum) / self.world_size
            grad_norm = self._clip_gradients()
            if torch.isfinite(loss_global) and torch.isfinite(grad_norm):
                self.optimizer.step()
                self.scheduler.step()
            else:
                skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss_global.item())
            grad_norms.append(grad_norm.item())
            for key, value in metric_sums.items():
                sums[key] += value
        names = [k for k in sums if k != "tokens"]
        totals = all_reduce_sum(torch.stack([sums[k] for k in names] + [sums["tokens"]]))
        metrics = {name: (totals[i] / totals[-1].clamp(min=1)).item() for i, name in enumerate(names)}
        metrics.update(loss=losses[0], grad_norm=grad_norms[0], skipped_updates=skipped)
        if len(losses) > 1:
            metrics["loss_last_iteration"] = losses[-1]
        return metrics

    def _clip_gradients(self) -> torch.Tensor:
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf  # inf: measure only
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters, max_norm)
        if isinstance(norm, DTensor):  # FSDP2: a partial norm per rank until reduced
            norm = norm.full_tensor()
        return norm.detach().float()

    # =============================================================================================
    # Logging, checkpoints, saving
    # =============================================================================================

    def _write_run_file(self) -> None:
        if self.dist.is_main and not self._run_file_written:
            write_run_file(self.config.output_dir, self.run_id)
            self._run_file_written = True

    def log(self, metrics: dict) -> None:
        self.history.append(metrics)
        if not self.dist.is_main:
            return
        self._write_run_file()
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, metrics["step"])

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter  # the package was checked for at construction

        return SummaryWriter(os.path.join(self.config.output_dir, "tensorboard"))

    def save_checkpoint(self) -> str:
        trainer_state = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "world_size": self.world_size,
        }
        self._write_run_file()
        return save_checkpoint(
            self.config.output_dir, self.step, model=self.policy, optimizer=self.optimizer,
            trainer_state=trainer_state, rank=self.rank, run_id=self.run_id, keep=self.config.keep_checkpoints,
        )

    def _resume(self, path: str) -> None:
        state = load_checkpoint(path, model=self.policy, optimizer=self.optimizer, rank=self.rank)
        if state["world_size"] != self.world_size:
            raise CheckpointError(f"{path} was written by {state['world_size']} processes, this run has {self.world_size}")
        self.step, self.run_id = state["step"], state["run_id"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.history = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
        barrier()
        if self.dist.is_main:  # drop what a crashed run logged past its last checkpoint
            with open(self.metrics_path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}")

    def save_model(self, path: str) -> None:
        """A Hugging Face directory (``from_pretrained``-loadable; LoRA: the adapter) plus tokenizer."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dist.is_main:
            state = {key.removeprefix("model."): value for key, value in state.items()}
            self.model.save_pretrained(path, state_dict=state)
            self.tokenizer.save_pretrained(path)

    def close(self) -> None:
        if dist.is_initialized():
            # Collective: no rank tears the group down while another still talks through it
            # (gloo aborts the late rank's process otherwise).
            dist.barrier()
            dist.destroy_process_group()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a line a crash tore (or any unreadable one) is left out, with a
    note, since the checkpoint, not the log, is what a resume needs."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
                    continue
            except ValueError:
                pass
            if line.strip():
                print(f"resume: {path}, line {line_number}: not a metrics record (torn by a crash?), dropped")
    return records


def plot_metrics(history: list[dict], path: str) -> None:
    """A PNG with the mean reward and the KL to the reference over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_reward.plot(steps, [r["reward"] for r in history], color="tab:blue")
    ax_reward.set(xlabel="step", ylabel="mean reward", title="reward")
    ax_kl.plot(steps, [r.get("kl", math.nan) for r in history], color="tab:red")
    ax_kl.set(xlabel="step", ylabel="KL(policy || reference)", title="KL to the reference (k3; none when beta = 0)")
    for ax in (ax_reward, ax_kl):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
