"""A run's files: its checkpoint, written whole or not at all and read back with a clear error (stale temporaries of
a killed writer are removed before a resume), its loss curve, and each process's record of what it trained on.

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
from studio.errors import DiskFull, StudioError


CHECKPOINT = "checkpoint.pt"


def write_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic.write_bytes(Path(run_dir) / CHECKPOINT, buffer.getvalue())


def save_run(run_dir: Path, state: dict[str, Any], saved_step: int | None) -> None:
    """The checkpoint of `state`, then `losses.json` and `loss.png`; on a full disk, an error naming the checkpoint
    that is kept (`saved_step`'s: atomic writes leave it whole) and how to go on."""
    from studio.plots import draw_loss, loss_series

    try:
        write_checkpoint(run_dir, state)
        atomic.write_json(run_dir / "losses.json", state["losses"])
        draw_loss(loss_series(state["losses"], checkpoint=state["step"]), run_dir / "loss.png",
                  title="training loss (MSE)")
    except DiskFull as err:
        kept = (f"the checkpoint of step {saved_step} is kept in {run_dir}" if saved_step is not None
                else "no checkpoint was written yet")
        raise atomic.disk_full(err.path, f"the checkpoint of step {state['step']} was not written and training "
                               f"stopped; {kept}", "continue with --resume latest") from None


def record_rank(run_dir: Path, rank: int, world_size: int, status: str, step: int, positions: list[int],
                trainable: dict[str, torch.nn.Parameter]) -> Path:
    """`ranks/rank-N.json`: what process N trained on (the data positions of its micro-batches) and a digest of its
    final weights, which every process of a run must agree on."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in trainable.items():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    record = {"rank": rank, "world_size": world_size, "status": status, "step": step, "positions": positions,
              "weights_sha256": digest.hexdigest()}
    return atomic.write_json(Path(run_dir) / "ranks" / f"rank-{rank}.json", record)


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
