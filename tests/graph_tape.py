"""CUDA graph recording of inference, emulated on the CPU as a tape of the operators, so the suite can test what
`studio.cuda_graphs` records and replays without a GPU.

What a real recording fixes, kept here: the operators launched during capture, with their arguments as they were
(Python numbers and decisions frozen; tensors by identity, so their contents at replay time are read: static inputs,
weights changed in place, intermediates); replay runs the same operators again and writes each result into the
tensor that capture produced, so the recorded output buffer is overwritten by every replay. A host synchronisation
during capture (`.item()`, `nonzero`) is refused, as CUDA refuses it. `install(monkeypatch)` puts the emulation in
place of `torch.cuda`'s graph API and makes `studio.cuda_graphs` treat the CPU as the GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


# Operators whose result the host waits for (under inference mode `item` and `is_nonzero` arrive undecomposed).
SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default, torch.ops.aten.is_nonzero.default,
         torch.ops.aten.equal.default, torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default}


class TapeGraph:
    """Stands in for `torch.cuda.CUDAGraph`: `capture` records, `replay` runs the tape."""

    def __init__(self) -> None:
        self.tape: list[tuple[Any, tuple, dict, Any]] = []

    def replay(self) -> None:
        for func, args, kwargs, out in self.tape:
            result = func(*args, **kwargs)
            for recorded, again in zip(pytree.tree_leaves(out), pytree.tree_leaves(result)):
                if isinstance(recorded, torch.Tensor) and recorded is not again:
                    recorded.copy_(again)


class _Capture(TorchDispatchMode):
    def __init__(self, graph: TapeGraph) -> None:
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in SYNCS:
            raise RuntimeError(f"{func} synchronises with the host: not allowed while capturing a CUDA graph")
        if _from_host(func, args, kwargs):
            raise RuntimeError(f"{func} copies from the host: not allowed while capturing a CUDA graph")
        out = func(*args, **kwargs)
        self.graph.tape.append((func, args, kwargs, out))
        return out


def _from_host(func: Any, args: tuple, kwargs: dict) -> bool:
    """A copy from the CPU onto another device (seen where the emulated GPU is `meta`: `install(..., meta=True)`)."""
    if func is torch.ops.aten._to_copy.default:
        source, target = args[0], kwargs.get("device")
        return source.device.type == "cpu" and target is not None and torch.device(target).type != "cpu"
    if func is torch.ops.aten.copy_.default:
        return args[1].device.type == "cpu" and args[0].device.type != "cpu"
    return False


class MetaReads(TorchDispatchMode):
    """Counts reads back from the meta device (`item`, `nonzero`, a tensor in an `if`), each of which waits for the
    device on a GPU, and answers them with stand-ins (0, True, no indices) so the call runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.places: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        meta = [a for a in args if isinstance(a, torch.Tensor) and a.device.type == "meta"]
        if func not in SYNCS or not meta:
            return func(*args, **kwargs)
        import traceback

        ours = [f for f in traceback.extract_stack() if "/site-packages/" not in f.filename and "graph_tape" not in
                f.filename]
        self.places.append(f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?")
        if func in (torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default):
            return True
        if func is torch.ops.aten.nonzero.default:
            return torch.zeros(0, meta[0].ndim, dtype=torch.long, device="meta")
        if func is torch.ops.aten.masked_select.default:
            return torch.zeros(0, dtype=meta[0].dtype, device="meta")
        return 0


@contextlib.contextmanager
def graph(graph: TapeGraph, pool: Any = None, **_: Any) -> Iterator[None]:
    with _Capture(graph):
        yield


class _Stream:
    def wait_stream(self, other: Any) -> None:
        pass


def install(monkeypatch: pytest.MonkeyPatch, *, meta: bool = False) -> None:
    """Recordings on the CPU for the rest of the test; with `meta`, on the meta device only (standing in for a GPU:
    it holds no values, so reads back and copies from the host show)."""
    import studio.cuda_graphs as cuda_graphs

    on_gpu = (lambda device: device.type == "meta") if meta else (lambda device: True)
    monkeypatch.setattr(cuda_graphs, "on_gpu", on_gpu)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", TapeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
