"""`torch.cuda.make_graphed_callables`, emulated on the CPU with the same buffer semantics, so the suite can test what
a recording does to the training loop without a GPU.

What a real recording fixes, kept here: inputs are copied into static input tensors; the forward "replay" writes
static output buffers, and the callable returns detached views of them (so the next replay overwrites what the last
one returned); the backward "replay" reads the static grad-output buffers and writes static grad-input buffers that
it returns, which autograd may hand to the parameters as their `.grad`; the backward always belongs to the latest
forward replay. The replays recompute instead of replaying kernels, so results equal plain launches exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


def make_graphed_callables(callables: Any, sample_args: Any, num_warmup_iters: int = 3,
                           allow_unused_input: bool = False, **_: Any) -> Any:
    one = not isinstance(callables, tuple)
    callables, sample_args = ((callables,), (sample_args,)) if one else (callables, sample_args)
    graphed = []
    for func, args in zip(callables, sample_args):
        if isinstance(func, torch.nn.Module):
            assert not (func._backward_hooks or func._forward_hooks or func._forward_pre_hooks)
        graphed.append(_Recording(func, tuple(pytree.arg_tree_leaves(*args)), num_warmup_iters, allow_unused_input))
    return graphed[0].callable if one else tuple(g.callable for g in graphed)


class _Recording:
    def __init__(self, func: Any, static_args: tuple[torch.Tensor, ...], warmups: int, allow_unused: bool) -> None:
        self.func = func.forward if isinstance(func, torch.nn.Module) else func
        self.params = tuple(func.parameters()) if isinstance(func, torch.nn.Module) else ()
        self.surface = static_args + self.params  # the static input surface: the sample args and the parameters
        self.allow_unused = allow_unused
        for _ in range(warmups):  # like the real warm-up: gradients by autograd.grad, no `.grad` touched
            self._forward()
            if any(o.requires_grad for o in self.live):
                self._backward(tuple(torch.ones_like(o) for o in self.live if o.requires_grad))
        self._forward()  # "capture"
        self.static_out = tuple(o.detach().clone() for o in self.live)
        self.static_grad_out = tuple(torch.empty_like(o) if o.requires_grad else None for o in self.live)
        self.static_grad_in: tuple[torch.Tensor | None, ...] | None = None
        self.callable = self._wrap(func)

    def _forward(self) -> None:
        with torch.enable_grad():
            out = self.func(*self.surface[: len(self.surface) - len(self.params)])
        self.live, self.spec = pytree.tree_flatten(out)

    def _backward(self, grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
        wanted = [i for i in self.surface if i.requires_grad]
        got = iter(torch.autograd.grad([o for o in self.live if o.requires_grad], wanted, grads,
                                       allow_unused=self.allow_unused) if wanted else ())
        return tuple(next(got) if i.requires_grad else None for i in self.surface)

    def replay_forward(self) -> None:
        self._forward()
        for buffer, out in zip(self.static_out, self.live):
            buffer.copy_(out.detach())

    def replay_backward(self) -> None:
        grads = self._backward(tuple(g for g in self.static_grad_out if g is not None))
        if self.static_grad_in is None:
            self.static_grad_in = tuple(None if g is None else g.detach().clone() for g in grads)
        else:
            for buffer, g in zip(self.static_grad_in, grads):
                if buffer is not None:
                    buffer.copy_(g)

    def _wrap(self, func: Any) -> Any:
        recording, n_user = self, len(self.surface) - len(self.params)

        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
                for static, given in zip(recording.surface[:n_user], inputs[:n_user]):
                    if static.data_ptr() != given.data_ptr():
                        static.copy_(given)
                recording.replay_forward()
                return tuple(o.detach() for o in recording.static_out)

            @staticmethod
            @torch.autograd.function.once_differentiable
            def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                for static, grad in zip(recording.static_grad_out, grads):
                    if static is not None and static.data_ptr() != grad.data_ptr():
                        static.copy_(grad)
                recording.replay_backward()
                return tuple(None if b is None else b.detach() for b in recording.static_grad_in)

        def functionalized(*user_args: Any) -> Any:
            out = Graphed.apply(*(tuple(pytree.arg_tree_leaves(*user_args)) + recording.params))
            return pytree.tree_unflatten(list(out), recording.spec)

        if not isinstance(func, torch.nn.Module):
            return functionalized
        trained, original = func.training, func.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return functionalized(*args, **kwargs) if func.training == trained else original(*args, **kwargs)

        func.forward = forward
        return func
