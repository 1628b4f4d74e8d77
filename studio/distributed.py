"""Process groups as accelerate sets them up, with one guard of our own."""

from __future__ import annotations

from typing import Any


def wait_for_everyone(state: Any) -> None:
    """Barrier over the processes of an accelerate launch (`state`: a PartialState or an Accelerator).

    On CPU process groups (gloo) the barrier runs without `device_ids`: accelerate before 1.16 passes them there too,
    which puts the gloo barrier on the GPU whenever one is visible and breaks the launch.
    """
    import torch.distributed as dist

    if getattr(state.distributed_type, "value", "") == "MULTI_CPU":
        dist.barrier()
    else:
        state.wait_for_everyone()
