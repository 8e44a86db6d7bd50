"""Rollouts: G sampled completions per prompt with the model's own ``generate``, and their masks.

Layout of a rollout of B = prompts x G rows (prompt p owns rows p*G .. p*G+G-1):

    prompt_ids      [B, P]  left-padded (pad, pad, p0, p1, ...)    prompt_mask     [B, P]
    completion_ids  [B, C]  right-padded after the first EOS        completion_mask [B, C]

The completion mask is 1 up to and including the first EOS, 0 after it; a completion that hit
``max_new_tokens`` without EOS is all ones.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompts: list  # the prompt text of each row
    completions: list  # the decoded completion of each row
    rows: list  # the dataset row (dict) of each completion
    rewards: torch.Tensor | None = None  # [B, K] float32, NaN = not scored
    advantages: torch.Tensor | None = None  # [B] float32

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    def select(self, index: list[int]) -> "Rollout":
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                picked[f.name] = None
            elif isinstance(value, torch.Tensor):
                picked[f.name] = value[torch.as_tensor(index, dtype=torch.long, device=value.device)]
            else:
                picked[f.name] = [value[i] for i in index]
        return Rollout(**picked)

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        """Rows of several rollouts; prompts re-padded on the left, completions on the right."""
        if len(parts) == 1:
            return parts[0]
        prompt_len = max(p.prompt_ids.shape[1] for p in parts)
        completion_len = max(p.completion_ids.shape[1] for p in parts)

        def pad(tensors, length, left):
            return torch.cat(
                [F.pad(t, (length - t.shape[1], 0) if left else (0, length - t.shape[1])) for t in tensors]
            )

        # pad ids with 0: padded positions are masked everywhere they are read
        return Rollout(
            prompt_ids=pad([p.prompt_ids for p in parts], prompt_len, True),
            prompt_mask=pad([p.prompt_mask for p in parts], prompt_len, True),
            completion_ids=pad([p.completion_ids for p in parts], completion_len, False),
            completion_mask=pad([p.completion_mask for p in parts], completion_len, False),
            prompts=sum((p.prompts for p in parts), []),
            completions=sum((p.completions for p in parts), []),
            rows=sum((p.rows for p in parts), []),
            rewards=None if parts[0].rewards is None else torch.cat([p.rewards for p in parts]),
        )


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it (all ones without EOS)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    length = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], length, dtype=torch.long))
    return (torch.arange(length, device=completion_ids.device)[None, :] <= first_eos[:, None]).long()


def format_prompt(prompt, tokenizer, system_prompt: str | None = None) -> str:
    """A string prompt as is (or, with a system prompt, as the user turn of a chat); a list of chat
    messages through the tokenizer's chat template."""
    if isinstance(prompt, str) and system_prompt is None:
        return prompt
    if isinstance(prompt, str):
        prompt = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(generator, tokenizer, rows: list[dict], config, eos_token_ids: list[int], device) -> Rollout:
    """G completions for each row's prompt, sampled by ``generator.generate`` (an HF causal LM or a
    wrapper around one)."""
    prompts = [format_prompt(row[config.prompt_column], tokenizer, config.system_prompt) for row in rows]
    encoded = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=config.max_prompt_length,
        add_special_tokens=False,
    )
    empty = (encoded["attention_mask"].sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"prompt {prompts[empty[0]]!r} has no tokens: every prompt needs at least one")
    G = config.num_generations
    prompt_ids = encoded["input_ids"].to(device).repeat_interleave(G, dim=0)
    prompt_mask = encoded["attention_mask"].to(device).repeat_interleave(G, dim=0)
    sequences = generator.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,  # 0 disables top-k (None would keep the model's default of 50)
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos_token_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    completion_ids = sequences[:, prompt_ids.shape[1] :]
    completion_mask = completion_mask_from_eos(completion_ids, eos_token_ids)
    completion_ids = completion_ids * completion_mask  # whatever followed EOS is no part of the sample
    completions = tokenizer.batch_decode(
        [ids[: int(n)] for ids, n in zip(completion_ids.tolist(), completion_mask.sum(1).tolist())],
        skip_special_tokens=True,
    )
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        prompts=[p for p in prompts for _ in range(G)],
        completions=completions,
        rows=[row for row in rows for _ in range(G)],
    )


def eos_token_ids(model, tokenizer) -> list[int]:
    generation_config = getattr(model, "generation_config", None)
    ids = getattr(generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an EOS token")
    return [ids] if isinstance(ids, int) else list(ids)
