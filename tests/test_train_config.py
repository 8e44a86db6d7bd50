"""The trainer's configuration: every field type-checked and range-checked when a GRPOConfig is built
(from Python, YAML or the command line), loss options validated before any model loads, and the
command line (transformers.HfArgumentParser) with its help and one-line errors."""

import dataclasses

import pytest
import torch

from grpo_kernels.train.config import ConfigError, GRPOConfig, load_config, parse_args

BAD_VALUES = [
    ({"resume": "false"}, r"resume must be true or false, got 'false' \(a string"),
    ({"gradient_checkpointing": 1}, r"gradient_checkpointing must be true or false, got 1"),
    ({"device": "gpu"}, r"device must be one of auto, cpu, cuda; got 'gpu'"),
    ({"mode": "fsdp"}, r"mode must be one of auto, single, ddp, fsdp2; got 'fsdp' \(did you mean 'fsdp2'\?\)"),
    ({"num_generations": 1}, r"num_generations must be >= 2 \(a group of one completion always has advantage 0"),
    ({"max_steps": 2.5}, r"max_steps must be an integer, got 2.5 \(float\)"),
    ({"max_steps": True}, r"max_steps must be an integer, got True"),
    ({"save_every": -1}, r"save_every must be >= 0"),
    ({"keep_checkpoints": 0}, r"keep_checkpoints must be >= 1 or null"),
    ({"beta": -0.04}, r"beta must be >= 0"),
    ({"epsilon_low": -0.2}, r"epsilon_low must be >= 0"),
    ({"epsilon_high": -0.28}, r"epsilon_high must be >= 0 or null"),
    ({"delta": 0.0}, r"delta must be > 0 or null"),
    ({"learning_rate": float("nan")}, r"learning_rate must be finite"),
    ({"temperature": 0}, r"temperature must be > 0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"adam_betas": [0.9]}, r"adam_betas must be two values in \[0, 1\)"),
    ({"reward_funcs": "gsm8k_answer"}, r"reward_funcs must be a list"),
    ({"reward_weights": [1.0, "x"]}, r"reward_weights\[1\] must be a number, got 'x'"),
    ({"loss_type": "ppo"}, r"loss_type must be one of grpo, .*vespo"),
    ({"vespo_k_pos": 1.0}, r"vespo_k_pos is only used by loss_type vespo; loss_type='dapo' would ignore it"),
    ({"loss_agg_mode": "mean"}, r"loss_agg_mode must be one of null, token-mean"),
    ({"clip_ratio_c": 0.5}, r"clip_ratio_c"),
    ({"loss_type": "cispo", "importance_sampling_level": "sequence"}, r"importance_sampling_level='sequence'"),
    ({"top_entropy_quantile": 1.5}, r"top_entropy_quantile must be in \[0, 1\]"),
    ({"loss_type": "dro"}, r"loss_type='dro' needs dro_beta"),
    ({"kl_tau": 0.1}, r"kl_tau is only used by loss_type ipo, prime_dppo"),
    ({"resume": True, "overwrite_output_dir": True}, r"resume and overwrite_output_dir contradict"),
    ({"reward_funcs": ["overlong_penalty"], "overlong_buffer": 0}, r"overlong_buffer must be in \(0, max_new_tokens"),
]


@pytest.mark.parametrize("values, message", BAD_VALUES, ids=[next(iter(v)) for v, _ in BAD_VALUES])
def test_bad_values_are_refused_when_the_config_is_built(values, message):
    with pytest.raises(ConfigError, match=message):
        GRPOConfig(**values)


def test_the_same_checks_from_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text('resume: "false"\n')
    with pytest.raises(ConfigError, match="resume must be true or false"):
        load_config(str(path))
    path.write_text("max_steps: 2.5\n")
    with pytest.raises(ConfigError, match="max_steps must be an integer"):
        parse_args(["--config", str(path)])
    path.write_text("learning_rate: 1e-6\nresume: false\nkeep_checkpoints: null\npacking: true\n")
    config = parse_args(["--config", str(path)])
    assert config.learning_rate == 1e-6 and config.resume is False and config.keep_checkpoints is None
    assert config.packing == "true"
    path.write_text("learning_rat: 1e-6\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        parse_args(["--config", str(path)])
    with pytest.raises(ConfigError, match=r"--config .*nope.yaml: no such file"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


def test_fields_set_after_construction_are_checked_by_the_trainer(tmp_path):
    from grpo_kernels.train import GRPOTrainer

    config = GRPOConfig(model="unused", output_dir=str(tmp_path))
    config.beta = -1.0
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        GRPOTrainer(config)


def test_missing_model_and_missing_cuda_are_named_before_anything_loads(tmp_path, monkeypatch):
    from grpo_kernels.train import GRPOTrainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"no model given: set `model` \(--model\)"):
        GRPOTrainer(GRPOConfig(output_dir=str(tmp_path)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda' but torch sees no CUDA device"):
        GRPOTrainer(GRPOConfig(model="unused", device="cuda", output_dir=str(tmp_path)))


def test_tensorboard_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    from grpo_kernels.train import GRPOTrainer

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="tensorboard=true needs the tensorboard package: pip install tensorboard"):
        GRPOTrainer(GRPOConfig(model="unused", tensorboard=True, output_dir=str(tmp_path)))


def test_help_lists_every_field_with_its_help_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(GRPOConfig):
        assert f"--{f.name}" in text, f.name
        first_words = " ".join(f.metadata["help"].split()[:3])
        assert first_words in " ".join(text.split()), f.name
    assert "--config FILE.yaml" in text
    # HfArgumentParser's generated --no_X flags: their help says what they do, not what --X does
    flat = " ".join(text.split())
    for name in ("save_final_model", "progress_bar", "resume", "tensorboard"):
        negative = f"--no_{name}, --no-{name.replace('_', '-')} "
        if negative in flat:
            assert flat.split(negative)[1].startswith(f"sets {name} to false (the same as --{name} false)"), flat
    assert "--no_progress_bar" in flat and "--no_save_final_model" in flat
    assert "show a tqdm progress bar (default: False)" not in flat
    from grpo_kernels.ops.grpo_loss import LOSS_TYPES

    assert "{" + ",".join(LOSS_TYPES) + "}" in text and "{auto,cpu,cuda}" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "d.jsonl"], "--model is required"),
        (["--model", "m"], "--dataset is required"),
        (["--model", "m", "--dataset", "d", "--lr", "1"], "unknown option --lr"),
        (["--model", "m", "--dataset", "d", "--num_generation", "4"], "unknown option --num_generation (did you mean 'num_generations'?)"),
        (["--model", "m", "--dataset", "d", "--loss_type", "ppo"], "argument --loss_type/--loss-type: invalid choice: 'ppo'"),
        (["--model", "m", "--dataset", "d", "--max_steps", "2.5"], "argument --max_steps/--max-steps: invalid int value: '2.5'"),
        (["--model", "m", "--dataset", "d", "--resume", "maybe"], "argument --resume: Truthy value expected"),
        (["--config", "/no/such.yaml"], "--config /no/such.yaml: no such file"),
    ],
)
def test_command_line_errors_are_one_line_and_exit_2(argv, message, capsys):
    from grpo_kernels.train.config import parse_args_or_exit

    with pytest.raises(SystemExit) as exit_info:
        parse_args_or_exit(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("grpo-kernels-train: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_nullable_and_list_fields_on_the_command_line():
    config = parse_args(["--epsilon_high", "null", "--keep_checkpoints", "null", "--lora_target_modules", "q_proj",
                         "v_proj", "--reward_funcs", "length", "--reward_weights", "0.5", "--no_progress_bar"])
    assert config.epsilon_high is None and config.keep_checkpoints is None and config.reward_weights == [0.5]
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.progress_bar is False
    assert parse_args(["--lora_target_modules", "null"]).lora_target_modules is None


def test_missing_train_extras_name_what_to_install(tmp_path, monkeypatch):
    """`datasets` (hub and save_to_disk datasets) and `peft` (lora_r > 0) come with grpo-kernels[train]."""
    import sys

    from grpo_kernels.train.data import load_rows

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"needs the datasets package: pip install 'grpo-kernels\[train\]'"):
        load_rows("openai/gsm8k")
    (tmp_path / "rows.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert load_rows(str(tmp_path / "rows.jsonl"))  # JSON Lines need no extra
    with pytest.raises(FileNotFoundError, match="no/such.jsonl: no such file"):
        load_rows("no/such.jsonl")
    from test_train_loop import tiny_trainer

    with pytest.raises(ImportError, match=r"lora_r > 0 needs peft: pip install 'grpo-kernels\[train\]'"):
        tiny_trainer(tmp_path / "run", lora_r=4)
