"""Atomic, verified checkpoints that resume exactly.

A checkpoint is a directory ``output_dir/checkpoint-<step>`` holding:

- ``model/`` and optimizer state through ``torch.distributed.checkpoint`` (each rank writes its
  own shards under FSDP2; the same code saves a single-device or DDP model),
- ``trainer_state.pt``: step, LR scheduler, data sampler position, run id (rank 0 writes it),
- ``rng_rank<r>.pt``: every rank's Python, NumPy, torch CPU and CUDA RNG states,
- ``manifest.json``, written last: the run id and the size and SHA-256 of every other file, plus
  the SHA-256 of the manifest's own content. A checkpoint is *complete* when its manifest is.

The save goes to ``checkpoint-<step>.tmp``; once every rank is done, rank 0 writes the manifest,
renames the directory into place (atomic on one file system) and rewrites the ``latest`` file
through a rename. Saving a step that already has a checkpoint first renames the old one to
``checkpoint-<step>.old`` and deletes it only once the new one is in place.

Resuming does not trust ``latest``: :func:`find_resumable` verifies the checkpoints of the
directory itself, newest step first (``.tmp`` and ``.old`` leftovers of an interrupted save
included), and takes the first intact one; every one it passes over is reported with the file at
fault. So a kill at any moment of a save, a truncated file or a flipped byte costs at most the
checkpoint it hit, never the run, and is never loaded silently.

Pruning only deletes checkpoints of the current run (the run id in their manifest, inherited on
resume) of steps before the one just written; another run's checkpoints are never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from grpo_kernels.train.distributed import barrier

MANIFEST = "manifest.json"
# checkpoint-<step>, or the .tmp / .old directory of an interrupted save of that step
_NAME = re.compile(r"^checkpoint-(\d+)(\.tmp|\.old)?$")
# the order in which directories of one step are tried: a staged save that completed (its manifest
# is written before the rename, so it is the newest), the installed one, the copy being replaced
_SUFFIX_ORDER = {".tmp": 0, None: 1, ".old": 2}
# Test hook: GRPO_KERNELS_CHECKPOINT_FAULT=<point> kills the process (SIGKILL, nothing cleaned up)
# when a save reaches that point; see SAVE_POINTS.
FAULT_ENV = "GRPO_KERNELS_CHECKPOINT_FAULT"
SAVE_POINTS = ("staging_created", "model_saved", "state_saved", "manifest_written", "old_set_aside",
               "installed", "latest_written")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, corrupt or from another layout), named with its file."""


def _fault_point(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


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


# --- saving ---------------------------------------------------------------------------------------


def save_checkpoint(output_dir: str, step: int, *, model, optimizer, trainer_state: dict, rank: int,
                    run_id: str, keep: int | None = 2) -> str:
    """Writes ``output_dir/checkpoint-<step>`` (collective: every rank calls it); returns its path.

    ``keep``: checkpoints of run ``run_id`` to keep, this one included (None: all)."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    staging = final + ".tmp"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        _fault_point("staging_created")
    barrier()
    with _single_process_is_fine():
        dcp.save(
            {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
            checkpoint_id=os.path.join(staging, "model"),
        )
    _fault_point("model_saved")
    _save_synced(rng_state(), os.path.join(staging, f"rng_rank{rank}.pt"))
    if rank == 0:
        _save_synced(dict(trainer_state, run_id=run_id), os.path.join(staging, "trainer_state.pt"))
        _fault_point("state_saved")
    barrier()
    if rank == 0:
        write_manifest(staging, run_id)
        _fault_point("manifest_written")
        aside = final + ".old"
        if os.path.isdir(final):  # never delete the only good copy before the new one is in place
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            _fault_point("old_set_aside")
        os.replace(staging, final)
        _fsync_directory(output_dir)
        _fault_point("installed")
        _write_atomically(os.path.join(output_dir, "latest"), os.path.basename(final))
        _fault_point("latest_written")
        shutil.rmtree(aside, ignore_errors=True)
        _prune(output_dir, keep, step, run_id)
    barrier()
    return final


def write_manifest(directory: str, run_id: str) -> None:
    """``directory/manifest.json``: size and SHA-256 of every file below ``directory``."""
    files = {}
    for path in sorted(_files_below(directory)):
        relative = os.path.relpath(path, directory)
        if relative != MANIFEST:
            files[relative] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    body = {"format": 1, "run_id": run_id, "files": files}
    manifest = dict(body, manifest_sha256=hashlib.sha256(_canonical(body)).hexdigest())
    _write_atomically(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1))


# --- finding, verifying, loading -------------------------------------------------------------------


@dataclass
class Candidate:
    path: str
    step: int


def checkpoint_dirs(output_dir: str) -> list[Candidate]:
    """Every ``checkpoint-<step>[.tmp|.old]`` directory, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), _SUFFIX_ORDER[match.group(2)], name))
    found.sort(key=lambda item: (-item[0], item[1]))
    return [Candidate(os.path.join(output_dir, name), step) for step, _, name in found]


def read_manifest(path: str) -> dict:
    """The verified manifest of checkpoint ``path``; CheckpointError naming the file at fault."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path}: incomplete (no {MANIFEST}: its save was interrupted)")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        body = {key: manifest[key] for key in ("format", "run_id", "files")}
        intact = hashlib.sha256(_canonical(body)).hexdigest() == manifest["manifest_sha256"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in body["files"].items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        intact = False
    if not intact:
        raise CheckpointError(f"{manifest_path}: corrupt (unreadable or its checksum does not match)")
    return manifest


def verify_checkpoint(path: str) -> dict:
    """Checks every file of checkpoint ``path`` against its manifest; returns the manifest.

    Raises CheckpointError naming the first missing, truncated or altered file."""
    manifest = read_manifest(path)
    for name, entry in manifest["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing")
        size = os.path.getsize(file)
        if size != entry["size"]:
            raise CheckpointError(f"{file}: truncated or altered ({size} bytes, the manifest says {entry['size']})")
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: corrupt (its SHA-256 does not match the manifest)")
    return manifest


def find_resumable(output_dir: str, log=print) -> tuple[str | None, list[str]]:
    """The newest intact checkpoint of ``output_dir`` (None if there is no checkpoint directory at
    all) and the problems of the newer ones it passed over.

    Raises CheckpointError when there are checkpoint directories but none is intact: resuming
    from scratch would silently throw the run away."""
    problems = []
    candidates = checkpoint_dirs(output_dir)
    for candidate in candidates:
        try:
            verify_checkpoint(candidate.path)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        for problem in problems:
            log(f"resume: skipping a checkpoint: {problem}")
        if problems:
            log(f"resume: falling back to {candidate.path}, the newest intact checkpoint")
        return candidate.path, problems
    if candidates:
        raise CheckpointError(
            f"no intact checkpoint in {output_dir} to resume from: " + "; ".join(problems)
            + ". Delete them or start afresh with --overwrite_output_dir"
        )
    return None, problems


def agree_on(value):
    """Rank 0's ``value`` on every rank (the verdict of a check only rank 0 ran)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_checkpoint(path: str, *, model, optimizer, rank: int) -> dict:
    """Restores model, optimizer and this rank's RNG in place from a verified checkpoint; returns the
    trainer state. Any failure is a CheckpointError naming ``path``."""
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if not os.path.isfile(rng_file):
        raise CheckpointError(f"{path} has no RNG state for rank {rank}: resume with the world size it was saved with")
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    try:
        with _single_process_is_fine():
            dcp.load(state, checkpoint_id=os.path.join(path, "model"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        set_rng_state(torch.load(rng_file, weights_only=False))
        return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    except Exception as error:  # verified files that still do not load: another model, a torch mismatch
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} does not load into this model and optimizer: {first_line}") from error


def run_id_of(path: str) -> str | None:
    try:
        return read_manifest(path)["run_id"]
    except CheckpointError:
        return None


# --- helpers ----------------------------------------------------------------------------------------


@contextmanager
def _single_process_is_fine():
    # torch.distributed.checkpoint warns when there is no process group; one process is a
    # supported layout here, not a mistake
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _files_below(directory: str):
    for root, _, names in os.walk(directory):
        for name in names:
            yield os.path.join(root, name)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_synced(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: str, text: str) -> None:
    staging = path + ".tmp"
    with open(staging, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


def _prune(output_dir: str, keep: int | None, current: int, run_id: str) -> None:
    """Keeps checkpoint-<current> and the newest ``keep - 1`` of run ``run_id``'s earlier checkpoints;
    deletes nothing of another run (or whose run cannot be told) and nothing of later steps."""
    if keep is None:
        return
    ours = [
        c for c in checkpoint_dirs(output_dir)
        if c.step < current and _NAME.match(os.path.basename(c.path)).group(2) is None and run_id_of(c.path) == run_id
    ]
    for candidate in ours[keep - 1:]:  # newest first
        shutil.rmtree(candidate.path, ignore_errors=True)
