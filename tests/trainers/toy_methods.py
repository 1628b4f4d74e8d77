"""Two test-only methods that prove the contract admits later ones: each trains through the unchanged loop.

`FrozenDown`: a LoRA whose down-projection A is a frozen seeded orthonormal basis and only B trains (the shape of
orthogonal adaptation). `SparseMasked`: a full-shape delta trained only where a fixed mask (the smallest |w|) is on
(the shape of SaRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trainers.method import Method, MethodConfig, add_output_delta, find_linears


@dataclass
class FrozenDownConfig(MethodConfig):
    method: ClassVar[str] = "frozen_down"
    lr: float = 1e-3
    rank: int = 4


class FrozenDown(Method):
    config_cls = FrozenDownConfig

    def attach(self, components: Any) -> None:
        self.pairs: dict[str, tuple[torch.Tensor, nn.Parameter]] = {}
        g = torch.Generator().manual_seed(1234)
        for path, layer in find_linears(components.unet, ["to_q", "to_v"]).items():
            basis = torch.linalg.qr(torch.randn(layer.in_features, self.config.rank, generator=g))[0]  # (in, r)
            a = basis.T.contiguous().to(layer.weight.device)  # (r, in), frozen orthonormal rows
            b = nn.Parameter(torch.zeros(layer.out_features, self.config.rank, device=layer.weight.device))
            self.pairs[f"unet.{path}"] = (a, b)
            add_output_delta(layer, lambda x, a=a, b=b: (x @ a.T.to(x.dtype)) @ b.T.to(x.dtype))

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        return {f"{m}.lora_B.weight": b for m, (_, b) in self.pairs.items()}

    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {m: (b @ a).detach() for m, (a, b) in self.pairs.items()}

    def export(self) -> tuple[dict[str, torch.Tensor], Any]:
        tensors = {}
        for m, (a, b) in self.pairs.items():
            tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"] = a.cpu(), b.detach().cpu()
        r = self.config.rank
        return tensors, self.meta(ranks=dict.fromkeys(self.pairs, r), alphas=dict.fromkeys(self.pairs, float(r)))


@dataclass
class SparseMaskedConfig(MethodConfig):
    method: ClassVar[str] = "sparse_masked"
    lr: float = 1e-3
    fraction: float = 0.1


class SparseMasked(Method):
    config_cls = SparseMaskedConfig

    def attach(self, components: Any) -> None:
        self.deltas: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
        for path, layer in find_linears(components.unet, ["to_k", "to_out.0"]).items():
            w = layer.weight.detach()
            k = max(1, int(self.config.fraction * w.numel()))
            mask = (w.abs() <= w.abs().flatten().kthvalue(k).values).to(w.dtype)  # the k smallest |w|
            delta = nn.Parameter(torch.zeros_like(w))
            self.deltas[f"unet.{path}"] = (delta, mask)
            add_output_delta(layer, lambda x, d=delta, mask=mask: F.linear(x, (d * mask).to(x.dtype)))

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        return {f"{m}.delta": d for m, (d, _) in self.deltas.items()}

    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {m: (d * mask).detach() for m, (d, mask) in self.deltas.items()}

    def export(self) -> tuple[dict[str, torch.Tensor], Any]:
        tensors, ranks = {}, {}
        for m, dw in self.delta_weights().items():  # an exact full-rank LoRA: dW = (U S) Vh
            u, s, vh = torch.linalg.svd(dw.float().cpu(), full_matrices=False)
            tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"] = vh, u * s
            ranks[m] = len(s)
        return tensors, self.meta(ranks=ranks, alphas={m: float(r) for m, r in ranks.items()})
