"""Reward functions: ``f(prompts, completions, **columns) -> list[float | None]``.

``prompts`` and ``completions`` are lists of strings, one entry per completion (a prompt is
repeated G times). ``columns`` holds every dataset column the same way, the config's
``answer_column`` also as ``answer``, plus ``completion_ids`` (lists of token ids) and
``completion_lengths`` (ints, EOS included). ``None`` (or NaN) means "could not score this one":
it is left out of the weighted sum; a completion no function scored is left out of the advantage
statistics (advantage 0, see group_advantages), and a batch that none scored is skipped with a
warning. A function must return a list (or tuple, 1-D array or tensor) of one number, bool or
``None`` per completion; anything else (None, a scalar, a generator, a dict, strings, nested
lists, +-inf) is an error naming the function.

Built in (names usable in ``GRPOConfig.reward_funcs``):

- ``gsm8k_answer``: the answer is the text inside the *last* complete ``<answer>...</answer>`` of
  the completion whose content contains no ``<answer>``, stripped. 2.0 if it equals the reference
  answer as a string, 1.5 if both parse as the same number (commas, ``$`` and a trailing ``.``
  ignored; ``1e-6`` relative tolerance), else 0.0. A reference of the form ``"... #### 72"``
  (GSM8K) is cut to what follows ``####``. ``None`` when the row has no answer.
- ``gsm8k_format``: 0.2 for each of the four tags ``<think>``, ``</think>``, ``<answer>``,
  ``</answer>`` that occurs exactly once in the completion (0.0 .. 0.8).
- ``overlong_penalty``: DAPO's soft overlong punishment with L_max = ``max_new_tokens`` and
  L_cache = ``overlong_buffer``: 0 for length <= L_max - L_cache, then falling linearly to -1 at
  L_max, and -1 beyond.
- ``length``: ``-|length - length_target| / max_new_tokens``, or ``-length / max_new_tokens``
  (shorter is better) when no target is set.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re

import numpy as np
import torch

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# a complete <answer>...</answer> whose content holds no <answer>: in "write <answer> at the end.
# <answer>72</answer>" the match starts at the second tag, not the first
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


def _as_number(text: str) -> float | None:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def gsm8k_answer_reward(prompts, completions, answer=None, **columns) -> list[float | None]:
    if answer is None:
        return [None] * len(completions)
    rewards = []
    for completion, reference in zip(completions, answer):
        if reference is None:
            rewards.append(None)
            continue
        reference = str(reference).split("####")[-1].strip()
        found = _ANSWER.findall(completion)
        if not found:
            rewards.append(0.0)
            continue
        given = found[-1].strip()
        given_number, reference_number = _as_number(given), _as_number(reference)
        if given == reference:
            rewards.append(2.0)
        elif (
            given_number is not None
            and reference_number is not None
            and math.isclose(given_number, reference_number, rel_tol=1e-6, abs_tol=1e-9)
        ):
            rewards.append(1.5)
        else:
            rewards.append(0.0)
    return rewards


def gsm8k_format_reward(prompts, completions, **columns) -> list[float]:
    return [0.2 * sum(completion.count(tag) == 1 for tag in TAGS) for completion in completions]


def overlong_penalty(max_new_tokens: int, overlong_buffer: int):
    if not 0 < overlong_buffer <= max_new_tokens:
        raise ValueError(f"overlong_buffer must be in (0, max_new_tokens={max_new_tokens}], got {overlong_buffer}")
    expected = max_new_tokens - overlong_buffer

    def overlong_penalty_reward(prompts, completions, completion_lengths, **columns) -> list[float]:
        return [
            0.0 if n <= expected else max(-1.0, (expected - n) / overlong_buffer) for n in completion_lengths
        ]

    return overlong_penalty_reward


def length_reward(max_new_tokens: int, target: int | None = None):
    def length_reward_(prompts, completions, completion_lengths, **columns) -> list[float]:
        if target is None:
            return [-n / max_new_tokens for n in completion_lengths]
        return [-abs(n - target) / max_new_tokens for n in completion_lengths]

    return length_reward_


# built-in rewards that compare with the reference answer (GRPOConfig.answer_column)
NEEDS_ANSWER = ("gsm8k_answer",)


def check_answer_column(config, rows: list[dict]) -> None:
    """A clear start-up error when a built-in reward in ``config.reward_funcs`` needs the answer
    column and the data has none (every row must have the key; its value may be null)."""
    needing = [name for name in config.reward_funcs if name in NEEDS_ANSWER]
    if not needing:
        return
    if config.answer_column is None:
        raise ValueError(f"reward {needing[0]!r} compares with a reference answer: set answer_column")
    for index, row in enumerate(rows):
        if config.answer_column not in row:
            raise ValueError(
                f"reward {needing[0]!r} reads answer_column={config.answer_column!r}, but row {index} of the "
                f"dataset has no such column (columns: {sorted(row)})"
            )


def build_reward_funcs(config) -> list:
    """The callables named by ``config.reward_funcs``: built-in names or ``package.module:function``."""
    builtins = {
        "gsm8k_answer": lambda: gsm8k_answer_reward,
        "gsm8k_format": lambda: gsm8k_format_reward,
        "overlong_penalty": lambda: overlong_penalty(config.max_new_tokens, config.overlong_buffer),
        "length": lambda: length_reward(config.max_new_tokens, config.length_target),
    }
    funcs = []
    for name in config.reward_funcs:
        if name in builtins:
            funcs.append(builtins[name]())
        elif ":" in name:
            module, _, attr = name.partition(":")
            try:
                func = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as error:
                raise ValueError(f"reward function {name!r} cannot be loaded: {error}") from None
            if not callable(func):
                raise ValueError(f"reward function {name!r} is a {type(func).__name__}, not a function")
            funcs.append(func)
        else:
            raise ValueError(f"unknown reward function {name!r}: use one of {sorted(builtins)} or 'module:function'")
    return funcs


def score(reward_funcs, prompts: list[str], completions: list[str], columns: dict) -> torch.Tensor:
    """Rewards ``[B, K]`` float32, one column per function; ``None`` becomes NaN."""
    table = torch.empty(len(completions), len(reward_funcs), dtype=torch.float32)
    for k, func in enumerate(reward_funcs):
        table[:, k] = torch.tensor(checked_rewards(func, func(prompts, completions, **columns), len(completions)))
    return table


def checked_rewards(func, values, count: int) -> list[float]:
    """``values`` as ``count`` floats (None -> NaN), or a ValueError naming ``func`` and what it returned."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    expected = f"expected a list of {count} floats (or None), one per completion"
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != 1:
            raise ValueError(f"reward function {name} returned a {values.ndim}-D {type(values).__name__} of shape "
                             f"{tuple(values.shape)}; {expected}")
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"reward function {name} returned {_describe(values)}; {expected}")
    if len(values) != count:
        raise ValueError(f"reward function {name} returned {len(values)} values for {count} completions")
    rewards = []
    for index, value in enumerate(values):
        if value is None:
            rewards.append(math.nan)
            continue
        if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
            value = value.item()
        if not isinstance(value, (numbers.Real, np.bool_)):
            raise ValueError(f"reward function {name} returned {_describe(value)} for completion {index}; {expected}")
        value = float(value)
        if math.isinf(value):
            raise ValueError(f"reward function {name} returned {value} for completion {index}: rewards must be finite "
                             "(None or NaN: not scored)")
        rewards.append(value)
    return rewards


def _describe(value) -> str:
    text = repr(value)
    return f"a {type(value).__name__} ({text[:80] + '...' if len(text) > 80 else text})"
