"""Atomic checkpoints that resume exactly.

A checkpoint is a directory ``output_dir/checkpoint-<step>`` holding:

- ``model/`` and optimizer state through ``torch.distributed.checkpoint`` (each rank writes its
  own shards under FSDP2; the same code saves a single-device or DDP model),
- ``trainer_state.pt``: step, LR scheduler, data sampler position (rank 0 writes it),
- ``rng_rank<r>.pt``: every rank's Python, NumPy, torch CPU and CUDA RNG states.

Everything is written into ``checkpoint-<step>.tmp`` first; once every rank is done, rank 0
renames it (an atomic rename on one file system) and then rewrites the ``latest`` file through a
rename as well. A crash at any moment leaves either the previous checkpoint or the new one, never
a half-written one that ``--resume`` would pick up. Saving a step that already has a checkpoint
(resuming a finished run saves it again) first renames the old one to ``checkpoint-<step>.old``
and deletes it only once the new one is in place.

Pruning keeps the checkpoint just written and the newest ``keep - 1`` ones before it; checkpoints
of later steps are left over from a run this one has overwritten (started again in the same
``output_dir``) and are pruned too.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from grpo_kernels.train.distributed import barrier


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str, step: int, *, model, optimizer, trainer_state: dict, rank: int, keep: int = 2) -> str:
    final = os.path.join(output_dir, f"checkpoint-{step}")
    staging = final + ".tmp"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    barrier()
    with _single_process_is_fine():
        dcp.save(
            {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
            checkpoint_id=os.path.join(staging, "model"),
        )
    torch.save(rng_state(), os.path.join(staging, f"rng_rank{rank}.pt"))
    if rank == 0:
        torch.save(trainer_state, os.path.join(staging, "trainer_state.pt"))
    barrier()
    if rank == 0:
        aside = final + ".old"
        if os.path.isdir(final):  # never delete the only good copy before the new one is in place
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(staging, final)
        _write_atomically(os.path.join(output_dir, "latest"), os.path.basename(final))
        shutil.rmtree(aside, ignore_errors=True)
        _prune(output_dir, keep, step)
    barrier()
    return final


def latest_checkpoint(output_dir: str) -> str | None:
    """The checkpoint ``output_dir/latest`` names; None when there is no ``latest`` file."""
    pointer = os.path.join(output_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        path = os.path.join(output_dir, f.read().strip())
    if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
        leftovers = [p for p in (path + ".old", path + ".tmp") if os.path.isdir(p)]
        hint = f"; an interrupted save left {' and '.join(leftovers)}" if leftovers else ""
        raise FileNotFoundError(f"{pointer} names {path}, which is no complete checkpoint{hint}")
    return path


def load_checkpoint(path: str, *, model, optimizer, rank: int) -> dict:
    """Restores model, optimizer and this rank's RNG in place; returns the trainer state."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with _single_process_is_fine():
        dcp.load(state, checkpoint_id=os.path.join(path, "model"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if not os.path.isfile(rng_file):
        raise ValueError(f"{path} has no RNG state for rank {rank}: resume with the world size it was saved with")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)


@contextmanager
def _single_process_is_fine():
    # torch.distributed.checkpoint warns when there is no process group; one process is a
    # supported layout here, not a mistake
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_atomically(path: str, text: str) -> None:
    staging = path + ".tmp"
    with open(staging, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


def _prune(output_dir: str, keep: int, current: int) -> None:
    """Keeps checkpoint-<current> and the newest ``keep - 1`` checkpoints of earlier steps."""
    if keep <= 0:
        return
    steps = sorted(
        int(name.split("-")[1])
        for name in os.listdir(output_dir)
        if name.startswith("checkpoint-") and name.split("-")[1].isdigit()
    )
    earlier = [step for step in steps if step < current]
    kept = {current, *earlier[max(0, len(earlier) - keep + 1):]}
    for step in steps:
        if step not in kept:
            shutil.rmtree(os.path.join(output_dir, f"checkpoint-{step}"), ignore_errors=True)
