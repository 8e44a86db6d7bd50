"""The trainer's configuration: one dataclass, loadable from YAML, overridable on the command line.

    grpo-kernels-train --config cfg.yaml --learning_rate 3e-6 --mode fsdp2 --resume

The command line is ``transformers.HfArgumentParser`` over :class:`GRPOConfig` (the way TRL's
CLIs work): every field is a ``--flag`` with a one-line help and, where there are any, its
choices; ``--config file.yaml`` sets any field from YAML first and the flags override it. A
boolean flag alone (``--resume``) means true; list fields take several values
(``--reward_weights 1.0 0.5``); ``null`` sets a field that allows None to None
(``--epsilon_high null``).

Every field is type-checked when a ``GRPOConfig`` is built, from Python, YAML or the command line
(``resume: "false"`` is an error, not a resume); a user error raises :class:`ConfigError`, which
the command line prints as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    """A user error in the configuration (a bad key, value, type or combination)."""


def option(default, help: str, choices: tuple | None = None):
    """A config field with its one-line help (and allowed values) for ``--help``."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


from grpo_kernels.ops.grpo_loss import KL_ESTIMATORS, LOSS_AGG_MODES, LOSS_TYPES, validate_loss_options

# The loss options the config forwards to ``fused_linear_grpo_loss`` (with the same names); the
# type-specific ones are forwarded only when set (None: the loss type's own default).
LOSS_OPTION_FIELDS = ("loss_type", "beta", "epsilon_low", "epsilon_high", "delta", "importance_sampling_level",
                      "top_entropy_quantile")
OPTIONAL_LOSS_OPTION_FIELDS = ("kl_estimator", "clip_ratio_c", "loss_agg_mode", "vespo_k_pos", "vespo_lambda_pos",
                               "vespo_k_neg", "vespo_lambda_neg", "kl_cov_ratio", "ppo_kl_coef", "clip_cov_ratio",
                               "clip_cov_lb", "clip_cov_ub", "dro_beta", "adv_tau", "kl_tau", "ipo_threshold")


@dataclass
class GRPOConfig:
    # --- model -------------------------------------------------------------------------------
    model: str = option("", "Hugging Face model id or local model directory (required on the command line)")
    tokenizer: str | None = option(None, "tokenizer id or directory; default: the model's")
    dtype: str = option("float32", "compute dtype of forward passes and generation; trained weights and AdamW "
                        "state stay float32, frozen weights (reference, LoRA base) are stored in it",
                        ("float32", "bfloat16", "float16"))
    attn_implementation: str = option("auto", "attention kernel passed to transformers; auto = flash_attention_2 "
                                      "if flash-attn and CUDA are present, else sdpa")
    packing: str = option("auto", "pack sequences without padding in the policy forward; auto = with "
                          "flash_attention_2", ("auto", "true", "false"))
    gradient_checkpointing: bool = option(False, "activation checkpointing of the decoder layers")
    lora_r: int = option(0, "LoRA rank; > 0 trains LoRA adapters through peft (pip install "
                         "'grpo-kernels[train]'), the reference is then the base model")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_target_modules: list[str] | None = option(None, "modules that get LoRA adapters; default: peft's choice")

    # --- data --------------------------------------------------------------------------------
    dataset: str = option("", "a .jsonl/.json file, a datasets.save_to_disk directory or a hub dataset name "
                          "(required on the command line)")
    dataset_split: str = option("train", "split of a hub or save_to_disk dataset")
    dataset_config: str | None = option(None, "configuration name of a hub dataset (e.g. main for openai/gsm8k)")
    prompt_column: str = option("prompt", "column holding the prompt (a string or a list of chat messages)")
    answer_column: str | None = option("answer", "reference-answer column; reward functions also get it as "
                                       "`answer`; null: none (gsm8k_answer then refuses to start)")
    system_prompt: str | None = option(None, "if set, string prompts become [system, user] chats through the "
                                       "chat template")

    # --- generation --------------------------------------------------------------------------
    prompts_per_step: int = option(8, "prompts per generation batch, over all ranks (divisible by the world size)")
    num_generations: int = option(8, "G, completions per prompt (>= 2: a group of one has no relative advantage)")
    max_prompt_length: int = option(512, "prompts are truncated on the left to this many tokens")
    max_new_tokens: int = option(256, "completion length limit")
    temperature: float = option(1.0, "sampling temperature, also applied to the logits in the loss")
    top_p: float = option(1.0, "nucleus sampling threshold in (0, 1]")
    top_k: int = option(0, "top-k sampling; 0 = off")

    # --- rewards and advantages --------------------------------------------------------------
    reward_funcs: list[str] = option(["gsm8k_answer", "gsm8k_format"], "reward functions: gsm8k_answer, "
                                     "gsm8k_format, overlong_penalty, length or package.module:function")
    reward_weights: list[float] | None = option(None, "one weight per reward function; default: all 1")
    overlong_buffer: int = option(64, "overlong_penalty: the last this-many tokens before max_new_tokens are "
                                  "penalized linearly (DAPO)")
    length_target: int | None = option(None, "length reward: -|len - target| / max_new_tokens; null: "
                                       "-len / max_new_tokens")
    scale_rewards: str = option("group", "advantage scaling: group std, batch std or none (Dr. GRPO)",
                                ("group", "batch", "none"))
    gfpo_keep: int | None = option(None, "GFPO: train on the best k of the G completions of each prompt")
    gfpo_metric: str = option("length", "GFPO ranking: length (shorter is better) or reward_per_token "
                              "(higher is better)", ("length", "reward_per_token"))
    dynamic_sampling: bool = option(False, "DAPO: drop groups whose rewards are all equal and generate more")
    max_sampling_rounds: int = option(4, "dynamic sampling gives up refilling after this many generation rounds")

    # --- loss --------------------------------------------------------------------------------
    loss_type: str = option("dapo", "GRPO-family loss (see docs/semantics.md)", LOSS_TYPES)
    beta: float = option(0.0, "KL coefficient (>= 0); 0 = no reference model at all")
    epsilon_low: float = option(0.2, "lower clip range of the importance ratio (>= 0)")
    epsilon_high: float | None = option(None, "upper clip range (>= 0); null = epsilon_low; DAPO's clip-higher "
                                        "uses 0.28")
    delta: float | None = option(None, "two-sided clip of the ratio at 1 + delta (INTELLECT-2; > 0); null = off")
    importance_sampling_level: str = option("token", "importance ratio per token, or per sequence (GSPO)",
                                            ("token", "sequence"))
    entropy_coef: float = option(0.0, "entropy bonus: the loss subtracts entropy_coef x the mean token entropy")
    kl_estimator: str | None = option(None, "KL estimator of the beta term (verl's names); null: k3",
                                      (None, *(k for k in KL_ESTIMATORS if k is not None)))
    clip_ratio_c: float | None = option(None, "dual clip (verl): the loss of A < 0 tokens is capped at "
                                        "-A x clip_ratio_c (> 1); null: off")
    loss_agg_mode: str | None = option(None, "verl's loss aggregation, normalized over all ranks; null: the loss "
                                       "type's own (TRL's)", (None, *LOSS_AGG_MODES))
    vespo_k_pos: float | None = option(None, "VESPO: k for A >= 0; null: the loss default")
    vespo_lambda_pos: float | None = option(None, "VESPO: lambda for A >= 0; null: the loss default")
    vespo_k_neg: float | None = option(None, "VESPO: k for A < 0; null: the loss default")
    vespo_lambda_neg: float | None = option(None, "VESPO: lambda for A < 0; null: the loss default")
    kl_cov_ratio: float | None = option(None, "KL-Cov: fraction of the tokens, by covariance, that get the KL "
                                        "penalty; null: the loss default")
    ppo_kl_coef: float | None = option(None, "KL-Cov: weight of that penalty; null: the loss default")
    clip_cov_ratio: float | None = option(None, "Clip-Cov: fraction of the tokens whose gradient is zeroed; "
                                          "null: the loss default")
    clip_cov_lb: float | None = option(None, "Clip-Cov: lower covariance bound of the candidates; null: the "
                                       "loss default")
    clip_cov_ub: float | None = option(None, "Clip-Cov: upper covariance bound of the candidates; null: the "
                                       "loss default")
    dro_beta: float | None = option(None, "DRO (loss_type dro, required there): weight of the quadratic "
                                    "log-ratio penalty (> 0)")
    adv_tau: float | None = option(None, "prime-rl (prime_dppo, ipo): scale of the advantage; null: the loss default")
    kl_tau: float | None = option(None, "prime-rl (prime_dppo, ipo): weight of the squared log-ratio; null: the "
                                  "loss default")
    ipo_threshold: float | None = option(None, "ipo: |p - p_old| beyond which a token leaves the policy term; null: "
                                         "the loss default")
    top_entropy_quantile: float = option(1.0, "train only on the tokens above this entropy quantile, in [0, 1]; "
                                         "1 = all tokens")

    # --- optimization ------------------------------------------------------------------------
    max_steps: int = option(100, "generation batches to train on")
    num_iterations: int = option(1, "mu: policy updates (optimizer steps) per generation batch")
    micro_batch_size: int = option(8, "completions per forward/backward on each rank (gradient accumulation)")
    learning_rate: float = option(1e-6, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_betas: list[float] = option([0.9, 0.99], "AdamW betas, two values in [0, 1)")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 = no clipping")
    warmup_steps: int = option(0, "optimizer steps of linear learning-rate warm-up")
    lr_schedule: str = option("constant", "learning-rate schedule after warm-up (decay to min_lr_ratio)",
                              ("constant", "linear", "cosine"))
    min_lr_ratio: float = option(0.0, "final learning rate of a decaying schedule, as a fraction, in [0, 1]")

    # --- distribution and bookkeeping --------------------------------------------------------
    mode: str = option("auto", "process layout; auto = ddp when launched with several processes, else single",
                       ("auto", "single", "ddp", "fsdp2"))
    device: str = option("auto", "auto = cuda when available, else cpu; cuda without CUDA is an error",
                         ("auto", "cpu", "cuda"))
    seed: int = option(0, "seed of weights-independent randomness (sampling, data order)")
    output_dir: str = option("runs/grpo", "where checkpoints, metrics.jsonl, metrics.png and final/ go")
    save_every: int = option(0, "checkpoint every K generation batches; 0 = only at the end")
    keep_checkpoints: int | None = option(2, "checkpoints of this run to keep (>= 1); null = keep all")
    resume: bool = option(False, "continue from the newest intact checkpoint in output_dir")
    overwrite_output_dir: bool = option(False, "start afresh in an output_dir holding another run: delete its "
                                        "checkpoints, latest and metrics.jsonl")
    save_final_model: bool = option(True, "write a from_pretrained-loadable model (LoRA: the adapter) to "
                                    "output_dir/final")
    tensorboard: bool = option(False, "also log to output_dir/tensorboard (needs: pip install tensorboard)")
    progress_bar: bool = option(True, "show a tqdm progress bar")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), _FIELD_TYPES[f.name]))
        if isinstance(self.packing, bool):  # a YAML/Python boolean for the tri-state is fine
            self.packing = "true" if self.packing else "false"
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            value = getattr(self, f.name)
            if allowed is not None and value not in allowed:
                listed = ", ".join("null" if a is None else str(a) for a in allowed)
                raise ConfigError(f"{f.name} must be one of {listed}; got {value!r}{_closest(value, allowed)}")
        positive = ("prompts_per_step", "num_generations", "max_prompt_length", "max_new_tokens", "micro_batch_size",
                    "num_iterations", "max_steps", "max_sampling_rounds", "lora_alpha")
        non_negative = ("lora_r", "top_k", "overlong_buffer", "warmup_steps", "save_every", "beta", "epsilon_low",
                        "weight_decay", "max_grad_norm", "learning_rate", "entropy_coef")
        for name in positive:
            _require(name, getattr(self, name) >= 1, ">= 1")
        for name in non_negative:
            _require(name, getattr(self, name) >= 0, ">= 0")
        _require("num_generations", self.num_generations >= 2,
                 ">= 2 (a group of one completion always has advantage 0; TRL refuses it too)")
        _require("temperature", self.temperature > 0, "> 0")
        _require("top_p", 0 < self.top_p <= 1, "in (0, 1]")
        _require("top_entropy_quantile", 0 <= self.top_entropy_quantile <= 1, "in [0, 1]")
        _require("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        _require("epsilon_high", self.epsilon_high is None or self.epsilon_high >= 0, ">= 0 or null")
        _require("delta", self.delta is None or self.delta > 0, "> 0 or null")
        _require("keep_checkpoints", self.keep_checkpoints is None or self.keep_checkpoints >= 1,
                 ">= 1 or null (keep all)")
        _require("length_target", self.length_target is None or self.length_target >= 0, ">= 0 or null")
        _require("adam_betas", len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                 "two values in [0, 1)")
        if self.gfpo_keep is not None and not 1 <= self.gfpo_keep <= self.num_generations:
            raise ConfigError(f"gfpo_keep must be in [1, num_generations={self.num_generations}], got {self.gfpo_keep}")
        if not self.reward_funcs:
            raise ConfigError("reward_funcs must name at least one reward function")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward_funcs"
            )
        if "overlong_penalty" in self.reward_funcs and not 0 < self.overlong_buffer <= self.max_new_tokens:
            raise ConfigError(f"overlong_buffer must be in (0, max_new_tokens={self.max_new_tokens}] for "
                              f"overlong_penalty, got {self.overlong_buffer}")
        if self.resume and self.overwrite_output_dir:
            raise ConfigError("resume and overwrite_output_dir contradict each other: set one of them")
        _validate_loss_options(self.loss_options())

    def loss_options(self) -> dict:
        """The options of ``fused_linear_grpo_loss`` this config sets (without the per-step ones)."""
        options = {name: getattr(self, name) for name in LOSS_OPTION_FIELDS}
        options.update({name: getattr(self, name) for name in OPTIONAL_LOSS_OPTION_FIELDS
                        if getattr(self, name) is not None})
        return dict(options, temperature=self.temperature, max_completion_length=self.max_new_tokens)


def _validate_loss_options(options: dict) -> None:
    """The loss kernel's own option checks (``validate_loss_options``), on the config alone: no
    tensors, no model."""
    options = {key: value for key, value in options.items() if key != "temperature"}
    try:
        validate_loss_options(**options)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from None


# --- type checking -------------------------------------------------------------------------------

_FIELD_TYPES = typing.get_type_hints(GRPOConfig)


def _require(name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {expected}")


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _checked(name: str, value, annotation):
    """``value`` if it is of the field's type (ints are fine where floats are), else a ConfigError."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if name == "packing" and isinstance(value, bool):
        return value
    origin = typing.get_origin(annotation)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r} ({type(value).__name__})")
        (item,) = typing.get_args(annotation)
        return [_checked(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            hint = " (a string: write true or false unquoted in YAML)" if isinstance(value, str) else ""
            raise ConfigError(f"{name} must be true or false, got {value!r}{hint}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r} (quote it in YAML)")
        return value
    raise TypeError(f"GRPOConfig.{name}: no type check for {_type_name(annotation)}")


def _closest(value, candidates) -> str:
    match = difflib.get_close_matches(str(value), [str(c) for c in candidates], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _number_strings_as_numbers(values: dict) -> dict:
    """YAML 1.1 reads ``1e-6`` (no dot) as a string: numeric fields take such strings as numbers."""
    converted = {}
    for key, value in values.items():
        annotation = _FIELD_TYPES[key]
        base = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        if isinstance(value, str) and base[0] in (int, float):
            try:
                value = base[0](value)
            except ValueError:
                pass  # the type check names the field
        converted[key] = value
    return converted


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    _check_keys(values, path)
    return values


def _check_keys(values: dict, where: str) -> None:
    known = [f.name for f in dataclasses.fields(GRPOConfig)]
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}: unknown config key {key!r}{_closest(key, known)}")


def load_config(path: str | None = None, overrides: dict | None = None) -> GRPOConfig:
    """A GRPOConfig from a YAML file (optional) with ``overrides`` (a dict of field values) on top."""
    values = _read_yaml(path) if path is not None else {}
    overrides = dict(overrides or {})
    _check_keys(overrides, "overrides")
    values.update(overrides)
    return GRPOConfig(**_number_strings_as_numbers(values))


# --- the command line ----------------------------------------------------------------------------


class _Parser:
    """``transformers.HfArgumentParser`` over GRPOConfig, plus ``--config`` and one-line errors."""

    def __init__(self, prog: str):
        from transformers import HfArgumentParser

        class Parser(HfArgumentParser):
            def error(self, message):  # argparse prints the whole usage and exits; one line is enough
                unknown = message.partition("unrecognized arguments: ")[2].split()
                if unknown:
                    key = unknown[0].lstrip("-").partition("=")[0].replace("-", "_")
                    message = f"unknown option {unknown[0]}{_closest(key, [f.name for f in dataclasses.fields(GRPOConfig)])}"
                raise ConfigError(message)

        self.parser = Parser(GRPOConfig, prog=prog, allow_abbrev=False, description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        self.parser.add_argument("--config", default=None, metavar="FILE.yaml",
                                 help="YAML file of config keys; flags given here override it")
        for action in self.parser._actions:
            name = action.dest
            if name in _FIELD_TYPES and type(None) in typing.get_args(_FIELD_TYPES[name]) and action.type is not None:
                action.type = _nullable(action.type)
            if action.option_strings and action.option_strings[0] == f"--no_{name}" and name in _FIELD_TYPES:
                # HfArgumentParser gives its generated --no_X flag the help of --X
                action.help = f"sets {name} to false (the same as --{name} false)"
            elif action.default is not argparse.SUPPRESS and action.help and action.dest != "help":
                action.help += " (default: %(default)s)"

    def parse(self, argv: list[str]) -> GRPOConfig:
        config_path = self._config_path(argv)
        defaults = _number_strings_as_numbers(_read_yaml(config_path)) if config_path else {}
        # TRL's way: the YAML values become the parser's defaults; flags given override them.
        # A default is not run through the flag's type function unless it is a string, so a YAML
        # value reaches GRPOConfig's type check as YAML typed it.
        for action in self.parser._actions:
            if action.dest in defaults:
                action.default = _Verbatim(defaults[action.dest])
        namespace = self.parser.parse_args(argv)
        values = {key: value.value if isinstance(value, _Verbatim) else value
                  for key, value in vars(namespace).items() if key != "config"}
        for key, value in values.items():  # `--lora_target_modules null`: the list field is None
            if isinstance(value, list) and None in value:
                if value != [None]:
                    raise ConfigError(f"--{key}: null can only stand alone")
                values[key] = None
        return GRPOConfig(**values)

    @staticmethod
    def _config_path(argv: list[str]) -> str | None:
        for i, arg in enumerate(argv):
            if arg == "--config":
                if i + 1 == len(argv):
                    raise ConfigError("--config needs a file name")
                return argv[i + 1]
            if arg.startswith("--config="):
                return arg.partition("=")[2]
        return None


class _Verbatim:
    """A YAML value standing in as an argparse default (argparse would re-parse a bare string)."""

    def __init__(self, value):
        self.value = value

    def __str__(self):
        return str(self.value)


def _nullable(convert):
    def parse(text: str):
        return None if text.lower() in ("null", "none", "~") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def parse_args(argv: list[str] | None = None, prog: str = "grpo-kernels-train") -> GRPOConfig:
    """The config the command line describes; a user error raises ConfigError. ``-h`` prints the help
    and exits."""
    return _Parser(prog).parse(sys.argv[1:] if argv is None else list(argv))


def parse_args_or_exit(argv: list[str] | None = None, prog: str = "grpo-kernels-train") -> GRPOConfig:
    """:func:`parse_args` for the console script: a user error is one line on stderr and exit status 2;
    the command line also needs ``--model`` and ``--dataset``."""
    try:
        config = parse_args(argv, prog)
        for name in ("model", "dataset"):
            if not getattr(config, name):
                raise ConfigError(f"--{name} is required (on the command line or as `{name}:` in the --config file)")
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return config
