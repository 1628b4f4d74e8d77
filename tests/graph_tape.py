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
        out = func(*args, **kwargs)
        self.graph.tape.append((func, args, kwargs, out))
        return out


@contextlib.contextmanager
def graph(graph: TapeGraph, pool: Any = None, **_: Any) -> Iterator[None]:
    with _Capture(graph):
        yield


class _Stream:
    def wait_stream(self, other: Any) -> None:
        pass


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recordings on the CPU for the rest of the test."""
    import studio.cuda_graphs as cuda_graphs

    monkeypatch.setattr(cuda_graphs, "on_gpu", lambda device: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", TapeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
