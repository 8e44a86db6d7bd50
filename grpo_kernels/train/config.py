"""The trainer's configuration: one dataclass, loadable from YAML, overridable on the command line.

    python -m grpo_kernels.train --config cfg.yaml --learning_rate 3e-6 --mode fsdp2 --resume

Every field below is also a YAML key and a ``--flag``. On the command line, a value for a string
field is taken as typed (``--system_prompt "Format: <think> then <answer>"``, ``--dataset_split no``;
``null`` means None where the field allows it); any other value is parsed as YAML
(``--reward_weights "[1.0, 0.5]"``, ``--epsilon_high null``); a boolean flag given alone
(``--resume``) means true.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml


@dataclass
class GRPOConfig:
    # --- model -------------------------------------------------------------------------------
    model: str = ""  # a Hugging Face model id or local directory
    tokenizer: str | None = None  # defaults to `model`
    # float32 | bfloat16 | float16: the compute dtype. Forward passes and generation run in it (autocast;
    # FSDP2: its mixed-precision param dtype, gradients reduced in float32); trainable parameters,
    # their gradients and the AdamW state stay float32 (master weights); frozen weights (the
    # reference model, a LoRA base) are stored in it.
    dtype: str = "float32"
    attn_implementation: str = "auto"  # auto (flash_attention_2 if installed, else sdpa) | sdpa | eager | ...
    # pack sequences without padding in the policy forward: auto (= with flash-attn) | true | false
    packing: str | bool = "auto"
    gradient_checkpointing: bool = False
    lora_r: int = 0  # > 0: train LoRA adapters through peft; the reference is the base model, adapters off
    lora_alpha: int = 16
    lora_target_modules: list[str] | None = None  # default: the attention/MLP projections peft picks

    # --- data --------------------------------------------------------------------------------
    dataset: str = ""  # a .jsonl file, a `datasets.save_to_disk` directory, or a hub dataset name
    dataset_split: str = "train"
    dataset_config: str | None = None  # the hub dataset's configuration name (e.g. "main" for openai/gsm8k)
    prompt_column: str = "prompt"
    # the reference-answer column: reward functions get it as `answer` (what gsm8k_answer reads) besides
    # under its own name; None: no reference answer (gsm8k_answer then refuses to start)
    answer_column: str | None = "answer"
    system_prompt: str | None = None  # set: string prompts become [system, user] chats through the chat template

    # --- generation --------------------------------------------------------------------------
    prompts_per_step: int = 8  # prompts per generation batch, over all ranks (divisible by world size)
    num_generations: int = 8  # G completions per prompt
    max_prompt_length: int = 512  # prompts are truncated on the left to this many tokens
    max_new_tokens: int = 256
    temperature: float = 1.0  # sampling temperature, also applied to the logits in the loss
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    # --- rewards and advantages --------------------------------------------------------------
    reward_funcs: list[str] = field(default_factory=lambda: ["gsm8k_answer", "gsm8k_format"])
    reward_weights: list[float] | None = None  # one per reward function; default all 1
    overlong_buffer: int = 64  # DAPO overlong shaping: the last `overlong_buffer` tokens are penalized linearly
    length_target: int | None = None  # length reward: -|len - target| / max_new_tokens (None: -len / max_new_tokens)
    scale_rewards: str = "group"  # group | batch | none
    gfpo_keep: int | None = None  # GFPO: keep the best k of the G completions of each prompt
    gfpo_metric: str = "length"  # length (shorter is better) | reward_per_token (higher is better)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal and generate more
    max_sampling_rounds: int = 4  # dynamic sampling gives up refilling after this many generation rounds

    # --- loss --------------------------------------------------------------------------------
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo
    beta: float = 0.0  # KL coefficient; 0 = no reference model at all
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None = epsilon_low; DAPO's clip-higher uses 0.28
    delta: float | None = None  # two-sided clip (INTELLECT-2)
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0

    # --- optimization ------------------------------------------------------------------------
    max_steps: int = 100  # generation batches
    num_iterations: int = 1  # mu: policy updates (optimizer steps) per generation batch
    micro_batch_size: int = 8  # completions per forward/backward on each rank
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    max_grad_norm: float = 1.0  # <= 0: no clipping
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to min_lr_ratio over the run)
    min_lr_ratio: float = 0.0

    # --- distribution and bookkeeping --------------------------------------------------------
    mode: str = "auto"  # auto (ddp when launched with several processes) | single | ddp | fsdp2
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    output_dir: str = "runs/grpo"
    save_every: int = 0  # checkpoint every K generation batches (0 = only at the end)
    keep_checkpoints: int = 2
    resume: bool = False  # continue from output_dir's latest checkpoint
    save_final_model: bool = True
    tensorboard: bool = False  # needs the tensorboard package
    progress_bar: bool = True

    def __post_init__(self):
        choices = {
            "scale_rewards": ("group", "batch", "none"),
            "mode": ("auto", "single", "ddp", "fsdp2"),
            "lr_schedule": ("constant", "linear", "cosine"),
            "gfpo_metric": ("length", "reward_per_token"),
            "dtype": ("float32", "bfloat16", "float16"),
            "packing": ("auto", "true", "false", True, False),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("prompts_per_step", "num_generations", "max_new_tokens", "micro_batch_size",
                     "num_iterations", "max_steps", "max_sampling_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gfpo_keep is not None and not 1 <= self.gfpo_keep <= self.num_generations:
            raise ValueError(f"gfpo_keep must be in [1, num_generations={self.num_generations}], got {self.gfpo_keep}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward_funcs"
            )


STRING_TYPES = ("str", "str | None")  # fields whose command-line values are taken as typed


def load_config(path: str | None = None, overrides: dict | None = None) -> GRPOConfig:
    """A GRPOConfig from a YAML file (optional) with ``overrides`` applied on top."""
    values = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
    types = {f.name: f.type for f in dataclasses.fields(GRPOConfig)}
    for key, value in values.items():
        # YAML 1.1 reads "1e-6" as a string; numbers are what the dataclass says they are
        if isinstance(value, str) and types[key].split(" |")[0] in ("float", "int"):
            try:
                values[key] = float(value) if types[key].startswith("float") else int(value)
            except ValueError:
                raise ValueError(f"{key} must be a number, got {value!r}") from None
        # YAML reads unquoted `no`, `on` or `2024` as no strings
        nullable = value is None and types[key] == "str | None"
        if types[key] in STRING_TYPES and not isinstance(value, str) and not nullable:
            raise ValueError(f"{key} must be a string, got {value!r} (quote it in YAML)")
    return GRPOConfig(**values)


def parse_args(argv: list[str]) -> GRPOConfig:
    """``--config file.yaml`` plus ``--key value`` / ``--key=value`` / ``--flag`` overrides."""
    types = {f.name: f.type for f in dataclasses.fields(GRPOConfig)}
    bool_fields = {name for name, type_ in types.items() if type_ == "bool"}
    config_path, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__)
            for f in dataclasses.fields(GRPOConfig):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                print(f"  --{f.name} (default: {default!r})")
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options look like --key value")
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not has_value:
            next_is_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if key in bool_fields and not next_is_value:
                value = "true"
            elif not next_is_value:
                raise ValueError(f"--{key} needs a value")
            else:
                i += 1
                value = argv[i]
        if key == "config":
            config_path = value
        elif types.get(key) in STRING_TYPES:
            overrides[key] = None if types[key] == "str | None" and value in ("null", "~") else value
        else:
            overrides[key] = yaml.safe_load(value)
        i += 1
    return load_config(config_path, overrides)
