"""The UNet's denoising step replayed as a CUDA graph: one launch per step instead of one per layer.

A small model such as `studio-tiny` spends a step of batch 1 launching kernels, not computing: hundreds of launches
of a few microseconds each, with the host in between. PyTorch's CUDA graphs (`torch.cuda.CUDAGraph`, "CUDA Graphs"
in the PyTorch docs) record those launches once and replay them with one call. A graph is a fixed program over fixed
buffers, so it is recorded per input shape, per adapter state (PEFT's scales are numbers baked into the recorded
kernels) and per place of the weights in memory, and used only where nothing else changes the computation between
steps: default attention processors, no forward hooks or wrappers, no extra UNet inputs. Anywhere else the UNet runs
as it always does, unless a composer vouches for what it installed (`recordable`: LoRA-Composer's boxes). A tagged
call merges its adapters into the weights in place and runs the base modules
(`studio.library.fuse`), so the recording of plain generation replays it too.

`graphed_unet(pipe)` is a context manager around a pipeline call; recorded graphs are kept on the UNet for the next
call (at most `MAX_GRAPHS`, least recently used first out).
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from studio.memory import parameter_of


MAX_GRAPHS = 8
_DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
_PLAIN_KWARGS = {"encoder_hidden_states", "timestep_cond", "cross_attention_kwargs", "added_cond_kwargs",
                 "return_dict"}


def on_gpu(device: torch.device) -> bool:
    """Where recordings apply (the suite's emulated recordings stand in for CUDA on the CPU)."""
    return device.type == "cuda"


def tuner_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's PEFT layers (path, layer): one walk of the module tree, made once per call (not per step)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]


def addresses(unet: nn.Module) -> int:
    """A fingerprint of where the UNet's parameters and buffers live. A recording reads them by address: weights
    changed in place (a merge, a sparse adapter) are read as they are, but a model moved away and back lives
    elsewhere, and an old recording would read freed memory. Taken once per call."""
    return hash(tuple(t.data_ptr() for t in (*unet.parameters(), *unet.buffers())))


def _adapter_state(layers: list[tuple[str, Any]]) -> tuple:
    """What PEFT `layers` bake into a recorded graph: active adapters, their scales, merges, disabled flags, and the
    addresses of the unmerged active adapters' tensors (a graph reads them by address: an adapter unloaded and loaded
    again lives elsewhere). Read at every step, since callbacks may change scales and active adapters between steps
    (LoRA Switch); the layers themselves are fixed for a call. Nothing for a UNet without PEFT layers."""
    state = []
    for name, module in layers:
        scaling = getattr(module, "scaling", {})
        live = () if module.merged or module.disable_adapters else tuple(
            p.data_ptr() for a in module.adapter_layer_names for n in module.active_adapters
            if n in getattr(module, a) for p in getattr(module, a)[n].parameters())
        state.append((name, tuple(module.active_adapters), tuple(sorted(scaling.items())),
                      tuple(module.merged_adapters), module.disable_adapters, live))
    return tuple(state)


def eligible(unet: nn.Module) -> str | None:
    """None when the UNet's step can be recorded as it stands, else why not: a composer's processor, hook or forward
    wrapper (LoRA Switch, Composite, CMLoRA, AutoLoRA's gates and a scheduled merge wrap `forward` on the instance
    to work per step; a recording would bypass the UNet's wrapper and freeze a layer's). One walk of the module tree
    (diffusers' `attn_processors` is a second one)."""
    for name, module in unet.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"a forward hook on {name or 'the UNet'}"
        if "forward" in module.__dict__:
            return f"a forward wrapper on {name or 'the UNet'}"
        processor = getattr(module, "processor", None) if hasattr(module, "set_processor") else None
        if processor is not None and type(processor).__name__ not in _DEFAULT_PROCESSORS:
            return f"attention processor {type(processor).__name__} at {name}.processor"
    return None


@dataclass
class Recordable:
    """A composer's word that the UNet call its forward wrapper makes at each step can be recorded: what it installed
    (processors, hooks, replaced forwards) reads only tensors fixed while it is installed, and Python state that
    `key()` returns; no host synchronisation, no copy from the host. `runner` is the recorder within `graphed_unet`."""

    key: Callable[[], tuple]
    token: object = field(default_factory=object)  # this installation: its recordings serve no other
    runner: Any = None
    outputs: StepOutputs | None = None  # what its step leaves in Python beside the UNet's output


class StepOutputs(Protocol):
    """Python objects a recordable step leaves behind (a composer's captured attention maps): `clear()` before each
    run while recording; `take()` after the recorded run returns them (they hold the recording's own tensors, which
    every replay overwrites in place); `put(taken)` after each replay hands them back as if the step had run."""

    def clear(self) -> None: ...

    def take(self) -> Any: ...

    def put(self, taken: Any) -> None: ...


def recordable(unet: nn.Module, key: Callable[[], tuple] | Recordable) -> Callable[[], None]:
    """Declare the installed composer's steps recordable (`Recordable`); returns the undo. Given a key function, the
    undo also drops the recordings made meanwhile (they read the composer's tensors); given the `Recordable` of an
    installation kept across calls (its tensors kept too), they stay for its next call until `forget_recordings`."""
    kept = isinstance(key, Recordable)
    entry = key if isinstance(key, Recordable) else Recordable(key)
    unet.__dict__["_studio_recordable"] = entry

    def undo() -> None:
        if unet.__dict__.get("_studio_recordable") is entry:
            del unet.__dict__["_studio_recordable"]
        if not kept:
            forget_recordings(unet, entry)

    return undo


def forget_recordings(unet: nn.Module, entry: Recordable) -> None:
    """Drop the recordings made for the composer installation `entry`."""
    graphs = unet.__dict__.get("_studio_graphs")
    if graphs is not None:
        graphs.forget(entry.token)


def step_runner(unet: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
    """What a recordable composer's wrapper calls for the step: the recorder within `graphed_unet`, else `original`."""
    entry = unet.__dict__.get("_studio_recordable")
    return entry.runner if entry is not None and entry.runner is not None else original


class UNetGraphs:
    """Recorded steps of one UNet, keyed by input shapes and adapter state; `__call__` has the UNet's signature."""

    def __init__(self, unet: nn.Module, forward: Callable[..., Any]) -> None:
        self.unet, self.forward = unet, forward
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, Any], torch.Tensor, Any]] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle()
        self.replays = 0
        self.layers: list[tuple[str, nn.Module]] = []  # the PEFT layers, read by `graphed_unet` at every call
        self.weights = 0  # `addresses(unet)`, likewise
        self.recordable: Recordable | None = None  # the installed composer's, within `graphed_unet`
        self.failed: dict[tuple, str] = {}  # keys whose recording failed -> why: plain launches for them

    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> Any:
        extra = kwargs.get("added_cond_kwargs") or {}
        if (args or set(kwargs) - _PLAIN_KWARGS or kwargs.get("timestep_cond") is not None
                or kwargs.get("cross_attention_kwargs") or not on_gpu(sample.device) or encoder_hidden_states is None
                or not all(isinstance(v, torch.Tensor) for v in extra.values())):
            return self.forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        t = torch.as_tensor(timestep)  # (), or (B,); a number, or on the host under `host_timesteps`
        number = t.device.type == "cpu" and t.ndim == 0
        inputs = {"sample": sample, "timestep": t.expand(sample.shape[0]) if t.ndim == 0 else t,  # (B,)
                  "encoder_hidden_states": encoder_hidden_states,
                  **{f"added.{k}": v for k, v in sorted(extra.items())}}
        composer = None if self.recordable is None else (self.recordable.token, self.recordable.key())
        key = (tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items()), _adapter_state(self.layers),
               self.weights, composer)
        if key in self.failed:
            return self.forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._record(inputs)
            except RuntimeError as error:  # something in the step cannot be recorded: plain launches for it
                self.failed[key] = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                warnings.warn(f"the UNet's step could not be recorded as a CUDA graph ({self.failed[key]}); it runs "
                              "with plain launches", stacklevel=2)
                return self.forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, static, out, taken = self.graphs[key]
        for name, value in inputs.items():
            if name == "timestep" and number:
                static[name].fill_(t.item())  # a number in the launch: no copy from the host to wait for
            else:
                static[name].copy_(value)
        graph.replay()
        self.replays += 1
        if taken is not None:
            self.recordable.outputs.put(taken)
        out = out.clone()  # (B, C, h, w): the next replay overwrites the recorded output
        if kwargs.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    def forget(self, token: object) -> None:
        """Drop the recordings made for a composer's installation `token`."""
        for key in [k for k in (*self.graphs, *self.failed) if k[-1] is not None and k[-1][0] is token]:
            self.graphs.pop(key, None)
            self.failed.pop(key, None)

    def _run(self, static: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {k.split(".", 1)[1]: v for k, v in static.items() if k.startswith("added.")}
        return self.forward(static["sample"], static["timestep"], static["encoder_hidden_states"],
                            added_cond_kwargs=added or None, return_dict=False)[0]

    def _record(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, dict[str, Any], torch.Tensor,
                                                                Any]:
        device = inputs["sample"].device
        static = {k: v.to(device, copy=True) for k, v in inputs.items()}
        outputs = None if self.recordable is None else self.recordable.outputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as recording requires
            for _ in range(2):
                if outputs is not None:
                    outputs.clear()
                self._run(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if outputs is not None:
            outputs.clear()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._run(static)
        return graph, static, out, None if outputs is None else outputs.take()


@contextlib.contextmanager
def host_timesteps(scheduler: Any) -> Iterator[None]:
    """DDIM's timesteps kept on the host within the block, whatever device the pipeline asks for. diffusers puts them
    on the pipeline's device, and DDIM's `step` indexes its table of alphas (on the host) with the timestep and
    compares it with 0: on a GPU, five reads back per step, each waiting for the recorded step to finish before the
    host can queue the next one. On the host the same arithmetic runs on the same numbers, and the recorder writes
    each timestep into its input as a number. Euler and DPM-Solver++ index their tables by a step counter already."""
    from diffusers import DDIMScheduler

    if type(scheduler) is not DDIMScheduler:
        yield
        return
    set_timesteps = scheduler.set_timesteps

    def on_host(*args: Any, device: Any = None, **kwargs: Any) -> None:
        set_timesteps(*args, **kwargs)

    scheduler.set_timesteps = on_host
    try:
        yield
    finally:
        del scheduler.set_timesteps


@contextlib.contextmanager
def graphed_unet(pipe: Any, enabled: bool = True) -> Iterator[UNetGraphs | None]:
    """Within the block, the pipeline's UNet steps replay recorded CUDA graphs where `eligible`, or where an
    installed composer declared its steps `recordable`; yields the recorder (None when off: disabled, not on CUDA,
    or neither)."""
    unet = getattr(pipe, "unet", None)
    entry = None if unet is None else unet.__dict__.get("_studio_recordable")
    if (not enabled or unet is None or not on_gpu(parameter_of(unet).device)
            or (entry is None and eligible(unet) is not None)):
        yield None
        return
    graphs = unet.__dict__.get("_studio_graphs")
    if graphs is None:  # the class's forward, whatever wraps the instance's now
        graphs = unet.__dict__["_studio_graphs"] = UNetGraphs(unet, types.MethodType(type(unet).forward, unet))
    graphs.layers = tuner_layers(unet)  # a walk of the whole tree at every step was 3 ms of host time (2 CPU cores)
    graphs.weights = addresses(unet)
    with host_timesteps(getattr(pipe, "scheduler", None)):
        if entry is not None:  # the composer's wrapper stays and calls the recorder for its step (`step_runner`)
            graphs.recordable, entry.runner = entry, graphs
            try:
                yield graphs
            finally:
                graphs.recordable, entry.runner = None, None
            return
        unet.forward = graphs  # an instance attribute: nn.Module.__call__ finds it before the class's forward
        try:
            yield graphs
        finally:
            del unet.forward
