"""A run's checkpoint file: written whole or not at all, read back with a clear error, and stale temporaries of a
killed writer removed before a resume.

The state is serialised in memory first and written as bytes (`studio.atomic.write_bytes`: temporary file, fsync,
rename), so a SIGKILL during the write leaves the previous checkpoint, and a full disk surfaces as `DiskFull` with the
previous checkpoint intact (torch's own file writer would report it as a RuntimeError without the errno).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from studio import atomic
from studio.errors import StudioError


CHECKPOINT = "checkpoint.pt"


def write_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic.write_bytes(Path(run_dir) / CHECKPOINT, buffer.getvalue())


def read_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The saved state (tensors on the CPU, `weights_only`), or a StudioError saying what to do."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise StudioError(f"{run_dir} holds no checkpoint to resume; start the run without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file
        raise StudioError(f"{path} cannot be resumed ({err}); delete {run_dir} to start again") from None


def restore(state: dict[str, Any], run_dir: Path, method: Any, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
            base_lrs: list[float], trainable: dict[str, torch.nn.Parameter]) -> None:
    """Put a checkpoint's method tensors, optimizer, lr schedule and the gradients of its open accumulation window
    back. A run resumed with another learning rate (`base_lrs`, e.g. lowered after a divergence) keeps the schedule's
    shape, rescaled to the new rate."""
    try:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    except StudioError:
        raise
    except Exception as err:  # a checkpoint of another method or shape
        raise StudioError(f"{Path(run_dir) / CHECKPOINT} cannot be resumed ({err}); delete {run_dir} to start "
                          "again") from None
    for i, (group, lr) in enumerate(zip(optimizer.param_groups, base_lrs)):
        old = lr_scheduler.base_lrs[i]
        if old != lr:
            group["lr"], group["initial_lr"] = group["lr"] * lr / old, lr
            lr_scheduler.base_lrs[i] = lr
            lr_scheduler._last_lr[i] = group["lr"]
    for name, grad in state["grads"].items():
        trainable[name].grad = grad.to(trainable[name].device, trainable[name].dtype)


def remove_stale_temporaries(run_dir: Path) -> int:
    """Delete the temporary files (`.NAME.*.tmp`) a killed writer left in the run folder; returns how many."""
    stale = [p for p in Path(run_dir).rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
