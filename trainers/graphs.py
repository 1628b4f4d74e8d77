"""The training step's text encoders and UNet, forward and backward, replayed as CUDA graphs (`--cuda-graphs`).

A small base such as `studio-tiny` spends a GPU training step launching kernels, not computing: about 6,500 operator
calls a step (text encoder 344 and UNet 2,231 forward, their backward, the loss; counted on the CPU without
autocast's casts), each with the host in between, so a DreamBooth-LoRA emblem took 0.185 s a step on one H200.
PyTorch's partial-network capture (`torch.cuda.make_graphed_callables`, "CUDA Graphs" in the PyTorch docs) records
each callable's forward and backward once and replays each with one call inside one autograd node, so the loop is
unchanged: the loss, gradient clipping and the fused optimizer run as before, and gradients reach the parameters'
`.grad` the usual way. The text step runs whether or not the text encoders train (no backward is recorded for
frozen ones).

A recording is a fixed program over fixed buffers, so it is used only where that holds (`why_not`):
- on CUDA, with gradients (a probe under `no_grad` before the recording runs the step as usual);
- a method whose models are plain module math between optimizer steps (`Method.graphable`: PEFT LoRA and its
  subclasses);
- default attention processors and no hooks on the UNet (the generation graphs' `studio.cuda_graphs.eligible`), no
  forward hooks in the text encoders;
- one micro-step per optimizer step: the backward replay writes the same gradient buffers every time, and
  autograd may hand those buffers to the parameters as their `.grad`, so a second micro-step would overwrite the
  first one's gradient instead of adding to it (`tests/trainers/test_graphs.py` shows it);
- no gradient checkpointing (it recomputes the forward inside the backward, which the recording already holds).
Autocast runs with its weight-cast cache off while graphs are on (`make_graphed_callables` requires it). The
recording's warm-up draws dropout masks inside `torch.random.fork_rng`, so a recorded run draws the same masks as a
plain one and a resumed run the same as one straight through.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def _text_encoders(pipe: Any) -> list[nn.Module]:
    return [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]


class TextStep(nn.Module):
    """The prompt embeddings from token tensors (`studio.prompts.encode_tokens`), as a recording needs them: SD
    returns (hidden (B, L, D),), SDXL (hidden, pooled (B, P))."""

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self.pipe = pipe  # not a module: the text encoders' parameters are found through `encoders`
        self.encoders = nn.ModuleList(_text_encoders(pipe))

    def forward(self, *tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from studio.prompts import encode_tokens

        hidden, pooled = encode_tokens(self.pipe, tokens)
        return (hidden,) if pooled is None else (hidden, pooled)


class UNetStep(nn.Module):
    """The UNet's noise prediction with positional tensor arguments only, as a recording needs them.

    sample (B, C, h, w), timestep (B,), encoder_hidden_states (B, L, D); SDXL adds text_embeds (B, P) and
    time_ids (B, 6). Returns the prediction (B, C, h, w).
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def why_not(method: Any, pipe: Any, device: torch.device, grad_accum: int,
            gradient_checkpointing: bool) -> str | None:
    """None when the training step can be recorded, else why not (said once, then the step runs eagerly)."""
    from studio.cuda_graphs import eligible

    if device.type != "cuda":
        return "not on a CUDA GPU"
    if not getattr(method, "graphable", False):
        return f"method {type(method).__name__} changes the UNet in ways a recording would not follow"
    if grad_accum != 1:
        return f"--grad-accum {grad_accum}: recorded backward passes would overwrite each other's gradients"
    if gradient_checkpointing:
        return "--gradient-checkpointing recomputes the forward inside the backward"
    for encoder in _text_encoders(pipe):
        hooked = next((n for n, m in encoder.named_modules() if m._forward_hooks or m._forward_pre_hooks), None)
        if hooked is not None:
            return f"a forward hook on the text encoder's {hooked or 'top module'}"
    return eligible(pipe.unet)


class GraphedStep:
    """The text encoders' and the UNet's step, each recorded (forward and backward) on the first call with
    gradients; the recording's warm-up runs three forward and backward passes on that call's inputs and leaves the
    parameters' `.grad` alone. Nothing that a recording cannot hold runs inside it: tokens, timesteps and SDXL's
    time ids arrive as tensors on the GPU."""

    def __init__(self, pipe: Any) -> None:
        self.text, self.unet = TextStep(pipe), UNetStep(pipe.unet)
        self.graphed: bool | None = None  # None: not yet recorded; False: recording failed, plain launches
        self.replays = 0

    def __call__(self, tokens: tuple[torch.Tensor, ...], sample: torch.Tensor, timestep: torch.Tensor,
                 time_ids: torch.Tensor | None, text_grad: bool) -> torch.Tensor:
        """The prediction (B, C, h, w); a view of the recording's output buffer when replayed, which the loss
        reads before the next replay."""
        extra = () if time_ids is None else (time_ids,)
        if self.graphed is None and torch.is_grad_enabled():
            self._record(tokens, sample, timestep, extra, text_grad)
        if not self.graphed:
            with torch.set_grad_enabled(text_grad and torch.is_grad_enabled()):
                embeds = self.text(*tokens)
            return self.unet(sample, timestep, *embeds, *extra)
        self.replays += 1
        return self.unet(sample, timestep, *self.text(*tokens), *extra)

    def _record(self, tokens: tuple[torch.Tensor, ...], sample: torch.Tensor, timestep: torch.Tensor,
                extra: tuple[torch.Tensor, ...], text_grad: bool) -> None:
        # Everything here draws dropout masks: the run's random streams are left where they were.
        with torch.random.fork_rng(devices=[sample.device] if sample.is_cuda else []):
            with torch.set_grad_enabled(text_grad):
                embeds = self.text(*tokens)  # eager, for the embeddings' shapes and whether they carry gradients
            unet_args = (sample, timestep, *embeds, *extra)
            samples = (tuple(t.clone() for t in tokens),
                       tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in unet_args))
            try:
                torch.cuda.make_graphed_callables((self.text, self.unet), samples, allow_unused_input=True)
                self.graphed = True
            except RuntimeError as error:  # something in the step cannot be recorded: plain launches from now on
                warnings.warn(f"--cuda-graphs: recording the training step failed ({error}); it runs without "
                              "graphs", stacklevel=3)
                self.graphed = False


def recorder(method: Any, pipe: Any, device: torch.device, config: Any) -> GraphedStep | None:
    """The run's `GraphedStep` when `config.cuda_graphs` asks for one and `why_not` finds nothing against it (a
    warning says why not otherwise); None without `--cuda-graphs`."""
    if not config.cuda_graphs:
        return None
    reason = why_not(method, pipe, device, config.grad_accum, config.gradient_checkpointing)
    if reason is not None:
        warnings.warn(f"--cuda-graphs: the training step runs without graphs: {reason}", stacklevel=3)
        return None
    return GraphedStep(pipe)
