"""Atomic, verified checkpoints that resume exactly.

A checkpoint is a directory ``output_dir/checkpoint-<step>`` holding:

- ``model/`` and optimizer state through ``torch.distributed.checkpoint`` (each rank writes its
  own shards under FSDP2; the same code saves a single-device or DDP model),
- ``trainer_state.pt``: step, LR scheduler, data sampler position, run id (rank 0 writes it),
- ``rng_rank<r>.pt``: every rank's Python, NumPy, torch CPU and CUDA RNG states,
- ``manifest.json``, written last: the run id, the step, and the size and SHA-256 of every other
  file, plus the SHA-256 of the manifest's own content. A checkpoint is *complete* when its
  manifest is. The step of a checkpoint is the one its manifest records, not its directory's name
  (a renamed ``checkpoint-2`` is still step 2).

The save goes to ``checkpoint-<step>.tmp``; once every rank is done, rank 0 writes the manifest,
renames the directory into place (atomic on one file system) and rewrites the ``latest`` file
through a rename. Saving a step that already has a checkpoint first renames the old one to
``checkpoint-<step>.old`` and deletes it only once the new one is in place.

Resuming does not trust ``latest``: :func:`find_resumable` verifies the checkpoints of the
directory itself, newest step first (``.tmp`` and ``.old`` leftovers of an interrupted save
included), and takes the first intact one; every one it passes over is reported with the file at
fault. So a kill at any moment of a save, a truncated file or a flipped byte costs at most the
checkpoint it hit, never the run, and is never loaded silently. Given the run id of the output
directory, it also passes over (and names) the checkpoints of any other run.

A checkpoint whose files are intact but do not fit the model (another architecture, another
``--model``) is not fallen back from: every checkpoint of a run has the same shapes, so the model
is what is wrong; :func:`load_checkpoint` raises one CheckpointError naming the checkpoint and the
first mismatching parameter, before anything is loaded.

Pruning only deletes checkpoints of the current run (the run id in their manifest, inherited on
resume) of steps before the one just written, and only under the name the trainer gave them;
another run's checkpoints, renamed ones and symbolic links are never touched. A save whose
directory name is taken by anything else (another run's checkpoint, a renamed one, a link) sets
that aside as ``checkpoint-<step>.kept[-<n>]`` rather than deleting it.
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from grpo_kernels.train.distributed import barrier

MANIFEST = "manifest.json"
# 1: run id and files (0.2.0); 2: also the step (the directory's name is not trusted for it)
MANIFEST_FORMATS = (1, 2)
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
                    run_id: str, keep: int | None = 2, log=print) -> str:
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
        write_manifest(staging, run_id, step)
        _fault_point("manifest_written")
        aside = final + ".old"
        if os.path.lexists(final) and not _replaceable(final, step, run_id):
            kept = _free_name(final + ".kept")
            os.rename(final, kept)
            log(f"checkpoint: {final} is not this run's checkpoint of step {step} (another run's, a renamed one "
                f"or a link): set aside as {kept}, not deleted")
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


def write_manifest(directory: str, run_id: str, step: int) -> None:
    """``directory/manifest.json``: run id, step, size and SHA-256 of every file below ``directory``."""
    files = {}
    for path in sorted(_files_below(directory)):
        relative = os.path.relpath(path, directory)
        if relative != MANIFEST:
            files[relative] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    body = {"format": 2, "run_id": run_id, "step": int(step), "files": files}
    manifest = dict(body, manifest_sha256=hashlib.sha256(_canonical(body)).hexdigest())
    _write_atomically(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1))


# --- finding, verifying, loading -------------------------------------------------------------------


@dataclass
class Candidate:
    path: str
    step: int


def checkpoint_name(name: str) -> bool:
    """Whether ``name`` is a checkpoint directory's name (``checkpoint-<step>[.tmp|.old]``)."""
    return _NAME.match(name) is not None


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
        body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
        intact = hashlib.sha256(_canonical(body)).hexdigest() == manifest["manifest_sha256"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in body["files"].items()]
        known = body["format"] in MANIFEST_FORMATS and isinstance(body["run_id"], str)
        if body["format"] == 2:
            known = known and type(body["step"]) is int
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        intact = known = False
    if not intact:
        raise CheckpointError(f"{manifest_path}: corrupt (unreadable or its checksum does not match)")
    if not known:
        raise CheckpointError(f"{manifest_path}: format {body.get('format')!r} is not one this grpo-kernels reads "
                              f"({', '.join(map(str, MANIFEST_FORMATS))}): written by a newer release?")
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


def manifest_step(path: str, manifest: dict) -> int:
    """The step of checkpoint ``path``: its manifest's (format 2), else its verified trainer state's
    (format 1, written by 0.2.0), else its directory's name."""
    if "step" in manifest:
        return manifest["step"]
    state_file, entry = os.path.join(path, "trainer_state.pt"), manifest["files"].get("trainer_state.pt")
    try:
        if entry is not None and _sha256(state_file) == entry["sha256"]:
            step = torch.load(state_file, weights_only=False).get("step")
            if type(step) is int:
                return step
    except Exception:  # noqa: BLE001 - unreadable: verify_checkpoint names the file when it is tried
        pass
    return int(_NAME.match(os.path.basename(path)).group(1))


def find_resumable(output_dir: str, log=print, run_id: str | None = None) -> tuple[str | None, list[str]]:
    """The newest intact checkpoint of ``output_dir`` (None if there is no checkpoint directory at
    all) and the problems of the newer ones it passed over. "Newest" is by the step each manifest
    records; a checkpoint whose manifest cannot be read is tried at the step of its name. With
    ``run_id`` (the output directory's run), another run's checkpoints are passed over too.

    Raises CheckpointError when there are checkpoint directories but none is intact: resuming
    from scratch would silently throw the run away."""
    problems = []
    candidates = []
    for candidate in checkpoint_dirs(output_dir):
        suffix = _SUFFIX_ORDER[_NAME.match(os.path.basename(candidate.path)).group(2)]
        try:
            manifest = read_manifest(candidate.path)
            step = manifest_step(candidate.path, manifest)
        except CheckpointError as error:
            manifest, step = error, candidate.step
        # newest step first; of one step, the directory named after it before a renamed one
        candidates.append((-step, suffix, step != candidate.step, candidate, manifest))
    candidates.sort(key=lambda item: item[:3])
    for minus_step, _, renamed, candidate, manifest in candidates:
        try:
            if isinstance(manifest, CheckpointError):
                raise manifest
            if run_id is not None and manifest["run_id"] != run_id:
                raise CheckpointError(f"{candidate.path}: written by run {manifest['run_id']}, not this output_dir's "
                                      f"run {run_id} (its {RUN_FILE})")
            verify_checkpoint(candidate.path)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        for problem in problems:
            log(f"resume: skipping a checkpoint: {problem}")
        if problems:
            log(f"resume: falling back to {candidate.path}, the newest intact checkpoint")
        if renamed:
            log(f"resume: {candidate.path} holds step {-minus_step} (its manifest), not {candidate.step} as its "
                "name says: resuming at its manifest's step")
        return candidate.path, problems
    if candidates:
        adopt = (f" (another run's checkpoint is resumed only where no {RUN_FILE} names a different run)"
                 if run_id else "")
        raise CheckpointError(
            f"no intact checkpoint {'of run ' + run_id + ' ' if run_id else ''}in {output_dir} to resume from: "
            + "; ".join(problems) + f". Delete them or start afresh with --overwrite_output_dir{adopt}"
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
    _check_same_model(path, state["model"])
    try:
        with _single_process_is_fine():
            dcp.load(state, checkpoint_id=os.path.join(path, "model"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        set_rng_state(torch.load(rng_file, weights_only=False))
        return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    # verified files that still do not load: another optimizer, a torch mismatch. dcp's
    # CheckpointException derives from BaseException, not Exception.
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"{path} does not load into this model and optimizer: {_first_line(error)}") from error


def _check_same_model(path: str, model_state: dict) -> None:
    """CheckpointError naming ``path`` and the first difference when the checkpoint's model entries
    (names and shapes, read from dcp's metadata) are not this model's."""
    try:
        metadata = dcp.FileSystemReader(os.path.join(path, "model")).read_metadata().state_dict_metadata
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"{path}: its model metadata does not load: {_first_line(error)}") from error
    saved = {key.removeprefix("model."): list(entry.size) for key, entry in metadata.items()
             if key.startswith("model.") and hasattr(entry, "size")}
    ours = {key: list(value.shape) for key, value in model_state.items() if isinstance(value, torch.Tensor)}
    differ = [f"{key}: {saved[key]} in the checkpoint, {ours[key]} here" for key in ours
              if key in saved and saved[key] != ours[key]]
    missing, unexpected = sorted(ours.keys() - saved.keys()), sorted(saved.keys() - ours.keys())
    if not (differ or missing or unexpected):
        return
    parts = []
    if differ:
        parts.append(f"{len(differ)} parameters differ in shape, e.g. {differ[0]}")
    if missing:
        parts.append(f"{len(missing)} parameters of this model are not in it ({_some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} of its are not in this model ({_some(unexpected)})")
    raise CheckpointError(f"{path} holds another model than this one (resumed with another --model?): "
                          + "; ".join(parts))


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _first_line(error: BaseException) -> str:
    """One line for an error; a CheckpointException's is its first rank's exception (its own str is a
    multi-line traceback per rank)."""
    if isinstance(error, CheckpointException) and error.failures:
        inner = next(iter(error.failures.values()))
        error = inner[0] if isinstance(inner, tuple) else inner
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def run_id_of(path: str) -> str | None:
    try:
        return read_manifest(path)["run_id"]
    except CheckpointError:
        return None


# --- the output directory's run ---------------------------------------------------------------------

# output_dir/run.json: the id of the run the directory belongs to, written when a run starts (or is
# first resumed there); resume passes over checkpoints of any other run.
RUN_FILE = "run.json"


def read_run_file(output_dir: str) -> str | None:
    """The run id recorded in ``output_dir/run.json`` (None: no such file); CheckpointError if unreadable."""
    path = os.path.join(output_dir, RUN_FILE)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            run_id = json.load(f)["run_id"]
        if isinstance(run_id, str) and run_id:
            return run_id
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    raise CheckpointError(f"{path}: unreadable (expected {{\"run_id\": \"...\"}}, the trainer writes it): "
                          "restore it, or delete it to resume from the newest intact checkpoint of any run")


def write_run_file(output_dir: str, run_id: str) -> None:
    _write_atomically(os.path.join(output_dir, RUN_FILE), json.dumps({"run_id": run_id}) + "\n")


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
    deletes nothing of another run (or whose run cannot be told), nothing of later steps, nothing
    renamed (its manifest's step is not its name's) and no symbolic link."""
    if keep is None:
        return
    ours = [
        c for c in checkpoint_dirs(output_dir)
        if c.step < current and _NAME.match(os.path.basename(c.path)).group(2) is None
        and not os.path.islink(c.path) and _is_checkpoint_of(c.path, c.step, run_id)
    ]
    for candidate in ours[keep - 1:]:  # newest first
        shutil.rmtree(candidate.path, ignore_errors=True)


def _is_checkpoint_of(path: str, step: int, run_id: str) -> bool:
    try:
        manifest = read_manifest(path)
        return manifest["run_id"] == run_id and manifest_step(path, manifest) == step
    except CheckpointError:
        return False


def _replaceable(path: str, step: int, run_id: str) -> bool:
    """Whether a save of ``step`` may replace ``path``: only this run's checkpoint of that step (by
    its readable manifest; damaged data files included, since resume skipped it anyway)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    return _is_checkpoint_of(path, step, run_id)


def _free_name(base: str) -> str:
    name, n = base, 1
    while os.path.lexists(name):
        n += 1
        name = f"{base}-{n}"
    return name
