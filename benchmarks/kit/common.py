"""What every kit stage shares: atomic result files, a deadline, relative errors, versions."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

# Distributions whose versions the results record (the peers travel as wheels, see device_wheels.sh).
VERSIONED = ("torch", "triton", "numpy", "transformers", "accelerate", "trl", "liger-kernel",
             "cut-cross-entropy", "datasets", "matplotlib")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a stage killed by its time cap leaves the previous complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class Deadline:
    """Seconds left until a stage must have written everything (its cap minus a safety margin)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64; inf when got has a NaN/inf that want has not."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all() and torch.isfinite(want).all():
        return math.inf
    denom = want.norm().item()
    diff = (got - want).norm().item()
    return diff / denom if denom > 0 else diff


def versions() -> dict:
    found = {}
    for dist in VERSIONED:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def device_info(device: torch.device) -> dict:
    import triton

    info = {"date": utc_now(), "python": platform.python_version(), "executable": sys.executable,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "versions": versions(), "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    else:
        info.update(device=f"cpu ({os.cpu_count()} cores)", capability=None)
    return info


def stage_device(dry_run: bool) -> torch.device:
    if dry_run or not torch.cuda.is_available():
        if not dry_run:
            raise SystemExit("no CUDA device: the kit measures GPUs only; use --dry-run on CPU")
        return torch.device("cpu")
    return torch.device("cuda")


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
