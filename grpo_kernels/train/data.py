"""Prompt data: rows from a JSONL / JSON file or a ``datasets`` dataset, and a resumable sampler.

A row is a dict with a prompt column (a string, or a list of chat messages) and any other
columns (e.g. ``answer``), which are handed to the reward functions by name.
"""

from __future__ import annotations

import json
import os

import torch


def load_rows(source, prompt_column: str = "prompt", split: str = "train", config_name: str | None = None) -> list[dict]:
    """Rows from ``source``: a list of dicts, a ``datasets.Dataset``, a ``.jsonl`` path (JSON Lines), a
    ``.json`` path (a JSON array of objects, or JSON Lines), a ``datasets.save_to_disk`` directory,
    or a dataset name for ``datasets.load_dataset``."""
    if isinstance(source, (str, os.PathLike)) and str(source).endswith((".jsonl", ".json")) and os.path.isfile(source):
        rows = _read_json_file(str(source), prompt_column)
    elif isinstance(source, (str, os.PathLike)):
        if not str(source):
            raise ValueError("no dataset given: set `dataset` to a .jsonl file or a datasets dataset")
        if str(source).endswith((".jsonl", ".json")) and not os.path.exists(source):
            raise FileNotFoundError(f"dataset {source}: no such file")
        try:
            import datasets
        except ImportError:
            raise ImportError(
                f"dataset {str(source)!r} is no .jsonl/.json file: reading a hub or save_to_disk dataset needs the "
                "datasets package: pip install 'grpo-kernels[train]' (or pip install datasets)"
            ) from None
        if os.path.isdir(source):
            dataset = datasets.load_from_disk(str(source))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(str(source), config_name, split=split)
        rows = list(dataset)
    else:
        rows = list(source)  # a datasets.Dataset iterates as dicts, as does a list of dicts
    if not rows:
        raise ValueError(f"dataset {source!r} has no rows")
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or prompt_column not in row:
            raise ValueError(f"row {index} of the dataset has no {prompt_column!r} column: {row!r:.200}")
    return rows


def _read_json_file(path: str, prompt_column: str) -> list[dict]:
    """A JSON array of objects (``.json`` only) or JSON Lines, one object per line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
        for index, row in enumerate(items):
            _check_row(row, prompt_column, f"{path}, item {index}")
        return items
    rows = []
    for line_number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is valid in JSON
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg}): {line.strip():.200}") from None
        _check_row(row, prompt_column, f"{path}, line {line_number}")
        rows.append(row)
    return rows


def _check_row(row, prompt_column: str, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if prompt_column not in row:
        raise ValueError(f"{where}: no {prompt_column!r} key (keys: {sorted(row)})")
    if not isinstance(row[prompt_column], (str, list)):
        raise ValueError(f"{where}: {prompt_column!r} must be a string or a list of chat messages")


class PromptSampler:
    """Endless shuffled batches of row indices, the same on every rank, resumable exactly.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)``; the state is two integers.
    """

    def __init__(self, num_rows: int, seed: int = 0):
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def next_batch(self, size: int) -> list[int]:
        batch = []
        while len(batch) < size:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(size - len(batch), self.num_rows - self.position)
            batch += self._order[self.position : self.position + take]
            self.position += take
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()
