"""The trainer's plain-Python parts: config loading, data loading, the sampler, reward functions
(checkpoints: test_train_checkpoints.py; the config's validation and the CLI: test_train_config.py)."""

import json
import math
import os

import pytest
import torch

from grpo_kernels.train.config import GRPOConfig, load_config, parse_args
from grpo_kernels.train.data import PromptSampler, load_rows
from grpo_kernels.train.rewards import (
    build_reward_funcs,
    check_answer_column,
    checked_rewards,
    gsm8k_answer_reward,
    gsm8k_format_reward,
    length_reward,
    overlong_penalty,
    score,
)
from grpo_kernels.train.rollout import completion_mask_from_eos
from grpo_kernels.train.trainer import lr_factor

# --- config ----------------------------------------------------------------------------------


def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: some/model\nlearning_rate: 1e-6\nnum_generations: 4\nreward_weights: [1.0, 0.5]\n")
    config = parse_args(
        ["--config", str(path), "--learning_rate", "3e-5", "--resume", "--mode=fsdp2",
         "--epsilon_high", "0.28", "--num-generations", "6"]
    )
    assert config.model == "some/model"
    assert config.learning_rate == pytest.approx(3e-5) and isinstance(config.learning_rate, float)
    assert config.resume is True and config.mode == "fsdp2"
    assert config.epsilon_high == pytest.approx(0.28) and config.num_generations == 6
    assert config.reward_weights == [1.0, 0.5]
    # YAML reads "1e-6" as a string: the config turns it into the float the field declares
    assert load_config(str(path)).learning_rate == pytest.approx(1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"learning_rat": 1.0}, "unknown config key"),
        ({"scale_rewards": "median"}, "scale_rewards must be one of"),
        ({"num_generations": 0}, "num_generations must be >= 1"),
        ({"gfpo_keep": 9, "num_generations": 8}, "gfpo_keep"),
        ({"reward_weights": [1.0]}, "reward_weights has 1 entries for 2"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_command_line_values_of_string_fields_stay_strings(tmp_path):
    """Only non-string fields are parsed as YAML: a prompt with a colon, `no`, a number-like model name."""
    config = parse_args(
        ["--system_prompt", "Format: <think> then <answer>", "--dataset_split", "no", "--model", "1234",
         "--tokenizer", "null", "--dataset_config=on", "--packing", "true", "--reward_weights", "1", "0.5",
         "--epsilon_high", "null", "--resume", "no"]
    )
    assert config.system_prompt == "Format: <think> then <answer>"
    assert config.dataset_split == "no" and config.model == "1234" and config.dataset_config == "on"
    assert config.tokenizer is None and config.epsilon_high is None  # null: None where the field allows it
    assert config.packing == "true" and config.reward_weights == [1, 0.5] and config.resume is False
    # in a YAML file an unquoted `no` is a boolean: a clear error instead of a config that reads False
    path = tmp_path / "cfg.yaml"
    path.write_text("dataset_split: no\n")
    with pytest.raises(ValueError, match=r"dataset_split must be a string, got False \(quote it in YAML\)"):
        load_config(str(path))
    path.write_text("dataset_split: 'no'\nsystem_prompt: null\n")
    assert load_config(str(path)).dataset_split == "no"


def test_command_line_errors():
    with pytest.raises(ValueError, match="argument --model: expected one argument"):
        parse_args(["--model"])
    with pytest.raises(ValueError, match="unknown option model=x"):
        parse_args(["model=x"])


def test_lr_schedule():
    f = dict(warmup=4, total=14, min_ratio=0.1)
    assert [lr_factor(s, schedule="constant", **f) for s in (0, 3, 4, 13)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_factor(4, schedule="cosine", **f) == pytest.approx(1.0)
    assert lr_factor(9, schedule="cosine", **f) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(14, schedule="linear", **f) == pytest.approx(0.1)


# --- data ------------------------------------------------------------------------------------


def test_jsonl_rows(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": [{"role": "user", "content": "hi"}]}\n')
    rows = load_rows(str(path))
    assert rows == [{"prompt": "1+1=", "answer": "2"}, {"prompt": [{"role": "user", "content": "hi"}]}]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a"}', '{"prompt": "b"', '{"prompt": "c"}'], r"data.jsonl, line 2: not valid JSON"),
        (['{"prompt": "a"}', "", '["prompt"]'], r"line 3: expected a JSON object"),
        (['{"prompt": "a"}', '{"question": "b"}'], r"line 2: no 'prompt' key"),
        (['{"prompt": 7}'], r"line 1: 'prompt' must be a string"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, lines, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_rows(str(path))


def test_json_array_file(tmp_path):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows, indent=2))  # several lines: no JSON Lines
    assert load_rows(str(path)) == rows
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # .json holding JSON Lines still reads
    assert load_rows(str(path)) == rows
    path.write_text(json.dumps([rows[0], ["prompt"]]))
    with pytest.raises(ValueError, match=r"data.json, item 1: expected a JSON object, got list"):
        load_rows(str(path))
    path.write_text(json.dumps([rows[0], {"question": "x"}]))
    with pytest.raises(ValueError, match=r"data.json, item 1: no 'prompt' key"):
        load_rows(str(path))
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": "b",}\n]\n')
    with pytest.raises(ValueError, match=r"data.json, line 3: not valid JSON"):
        load_rows(str(path))


def test_datasets_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list([{"question": "2+2=", "answer": "4"}, {"question": "1+0=", "answer": "1"}])
    assert load_rows(dataset, prompt_column="question")[1] == {"question": "1+0=", "answer": "1"}
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert len(load_rows(str(tmp_path / "saved"), prompt_column="question")) == 2
    with pytest.raises(ValueError, match="row 0 of the dataset has no 'prompt' column"):
        load_rows(dataset)


def test_sampler_covers_epochs_and_resumes_exactly():
    sampler = PromptSampler(5, seed=3)
    first_epoch = sampler.next_batch(5)
    assert sorted(first_epoch) == list(range(5))
    sampler.next_batch(3)
    state = sampler.state_dict()
    expected = [sampler.next_batch(4) for _ in range(3)]
    restored = PromptSampler(5, seed=3)
    restored.load_state_dict(state)
    assert [restored.next_batch(4) for _ in range(3)] == expected
    assert PromptSampler(5, seed=4).next_batch(5) != first_epoch or PromptSampler(5, seed=5).next_batch(5) != first_epoch


# --- rewards ---------------------------------------------------------------------------------


def test_gsm8k_answer_reward():
    completions = [
        "<think>9 - 2</think><answer>7</answer>",  # exact
        "<answer>3</answer> then <answer> 7.0 </answer>",  # the last answer counts; numerically equal
        "<answer>$1,000</answer>",  # numerically equal after dropping $ and ,
        "<answer>8</answer>",  # wrong
        "7",  # no answer tag
        "<answer>seven</answer>",  # not a number
        "I will write <answer> at the end. <answer>7</answer>",  # an unclosed tag before the answer
        "<answer>7</answer> and a stray </answer>",  # the last complete pair
        "<answer>\n7\n</answer>",
    ]
    answers = ["7", "7", "1000", "7", "7", "7", "7", "7", "7"]
    assert gsm8k_answer_reward(None, completions, answer=answers) == [2.0, 1.5, 1.5, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0]
    assert gsm8k_answer_reward(None, ["<answer>72</answer>"], answer=["so 72 in all #### 72"]) == [2.0]
    assert gsm8k_answer_reward(None, ["<answer>1</answer>"]) == [None]
    assert gsm8k_answer_reward(None, ["<answer>1</answer>"], answer=[None]) == [None]


def test_gsm8k_format_reward():
    completions = [
        "<think>a</think><answer>1</answer>",
        "<think>a</think> 1",
        "<think><think></think><answer>1</answer>",  # <think> twice: not counted
        "plain",
    ]
    assert gsm8k_format_reward(None, completions) == pytest.approx([0.8, 0.4, 0.6, 0.0])


def test_overlong_and_length_rewards():
    penalty = overlong_penalty(max_new_tokens=10, overlong_buffer=4)
    assert penalty(None, [""] * 5, completion_lengths=[3, 6, 7, 9, 10]) == pytest.approx([0, 0, -0.25, -0.75, -1.0])
    assert length_reward(10)(None, [""] * 2, completion_lengths=[2, 10]) == pytest.approx([-0.2, -1.0])
    assert length_reward(10, target=4)(None, [""] * 2, completion_lengths=[2, 7]) == pytest.approx([-0.2, -0.3])
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty(10, 0)


def _third(prompts, completions, **columns):
    return [None, 1.0, 0.5][: len(completions)]


def test_score_table_and_reward_lookup():
    config = GRPOConfig(reward_funcs=["gsm8k_answer", "length", f"{__name__}:_third"], max_new_tokens=10)
    funcs = build_reward_funcs(config)
    table = score(
        funcs,
        ["p"] * 3,
        ["<answer>4</answer>", "x", "<answer>5</answer>"],
        {"answer": ["4", "4", "4"], "completion_lengths": [5, 1, 5]},
    )
    expected = torch.tensor([[2.0, -0.5, math.nan], [0.0, -0.1, 1.0], [0.0, -0.5, 0.5]])
    torch.testing.assert_close(table, expected, equal_nan=True)
    with pytest.raises(ValueError, match="returned 3 values for 2 completions"):
        score([lambda prompts, completions, **c: [1.0, 2.0, 3.0]], ["p", "p"], ["a", "b"], {})
    with pytest.raises(ValueError, match="unknown reward function 'accuracy'"):
        build_reward_funcs(GRPOConfig(reward_funcs=["accuracy"]))


def test_completion_mask_from_eos():
    ids = torch.tensor([[5, 1, 7, 7], [5, 6, 7, 8], [1, 0, 0, 0], [4, 2, 1, 2]])
    mask = completion_mask_from_eos(ids, eos_token_ids=[1, 2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]


def test_jsonl_written_by_json_dumps_roundtrips(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i), "extra": [i]} for i in range(3)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_rows(str(path)) == rows


def test_answer_column_check():
    rows = [{"question": "1+1=", "solution": "2"}, {"question": "2+2="}]
    config = GRPOConfig(reward_funcs=["gsm8k_answer", "gsm8k_format"], answer_column="solution")
    with pytest.raises(ValueError, match=r"answer_column='solution', but row 1 of the dataset has no such column"):
        check_answer_column(config, rows)
    check_answer_column(config, rows[:1])
    with pytest.raises(ValueError, match="set answer_column"):
        check_answer_column(GRPOConfig(answer_column=None), rows)
    check_answer_column(GRPOConfig(reward_funcs=["gsm8k_format"], answer_column=None), rows)  # needs no answer


def _returns(value):
    def odd_reward(prompts, completions, **columns):
        return value() if callable(value) else value

    return odd_reward


@pytest.mark.parametrize(
    "value, message",
    [
        (None, r"returned a NoneType \(None\)"),
        (1.0, r"returned a float \(1.0\)"),
        (lambda: (x for x in [1.0, 0.0]), r"returned a generator"),
        ({"a": 1.0, "b": 0.0}, r"returned a dict \(\{'a': 1.0, 'b': 0.0\}\)"),  # its keys used to become rewards
        ("10", r"returned a str \('10'\)"),
        (["1", "0"], r"returned a str \('1'\) for completion 0"),
        ([[1.0], [0.0]], r"returned a list \(\[1.0\]\) for completion 0"),
        (torch.ones(2, 1), r"returned a 2-D Tensor of shape \(2, 1\)"),
        ([1.0, math.inf], r"returned inf for completion 1: rewards must be finite"),
        ([1.0], r"returned 1 values for 2 completions"),
    ],
)
def test_malformed_reward_is_an_error_naming_the_function(value, message):
    with pytest.raises(ValueError, match=r"reward function .*odd_reward " + message):
        score([_returns(value)], ["p", "p"], ["a", "b"], {})


def test_reward_values_that_are_fine():
    assert checked_rewards(len, (True, 0, None), 3)[:2] == [1.0, 0.0]
    assert math.isnan(checked_rewards(len, [None], 1)[0]) and math.isnan(checked_rewards(len, [math.nan], 1)[0])
    assert checked_rewards(len, torch.tensor([0.5, 1.0]), 2) == [0.5, 1.0]
    import numpy as np

    assert checked_rewards(len, [np.float32(0.25), torch.tensor(2.0)], 2) == [0.25, 2.0]
