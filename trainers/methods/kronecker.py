"""DiffuseKronA: a Kronecker-product adapter on the UNet's attention projections (Marjit et al., arXiv:2402.17412).

Paper section 3.2: dW = A (x) B with A in R^{a1 x a2}, B in R^{b1 x b2}, a1 b1 = d_out, a2 b2 = d_in, added in
parallel to the q, k, v and out projections of every UNet attention (the paper's `kqvo`; text encoder frozen;
adapting the feed-forward layers doubled the parameters without helping, App. D.1). Scale 1. Init as the authors'
code: A ~ N(0, 1/a1^2), B = 0, so training starts exactly at the base.

Factor choice. Only a1 * a2 sets the parameter count (a1 a2 + d_out d_in / (a1 a2)); the paper's best pair is
(a1, a2) = (4, 64). The library stores these factors as LoKr `lokr_w1` (= A) and `lokr_w2` (= B), which PEFT and
LyCORIS rebuild with `decompose_factor=f` as (a1, b1) = factorization(d_out, f), (a2, b2) = factorization(d_in, f):
a square A (f x f) whenever f divides both dims. So `factor` is that f, computed per module with PEFT's own
`factorization`; the default 16 gives a1 a2 = 256, the parameter count of the paper's (4, 64), in a layout every
LoKr loader reads. The stored r = alpha = max(a1, a2, b1, b2) makes PEFT build both factors full at scale 1.
Defaults: lr 5e-4 (paper section 4.1; stable from 1e-4 to 1e-3), about 1000 steps, about 3 images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from peft.tuners.lokr.layer import factorization
from torch import nn

from studio.errors import StudioError
from studio.library.meta import AdapterMeta
from trainers.method import Method, MethodConfig, add_output_delta, find_linears, split_targets


@dataclass
class KroneckerConfig(MethodConfig):
    method: ClassVar[str] = "kronecker"
    min_images: ClassVar[int] = 3

    lr: float = field(default=5e-4, metadata={"help": "learning rate (DiffuseKronA section 4.1: 5e-4)"})
    factor: int = field(
        default=16,
        metadata={
            "help": "Kronecker factor f: A is f x f where f divides the layer's "
            "dims (PEFT/LyCORIS decompose_factor); -1: near sqrt(d)"
        },
    )
    target_modules: str = field(
        default="to_q,to_k,to_v,to_out.0", metadata={"help": "UNet layers to adapt, comma-separated name suffixes"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factor == 0 or self.factor < -1:
            raise StudioError(f"--factor must be -1 or a positive integer, got {self.factor}")
        split_targets(self.target_modules)


class Kronecker(Method):
    config_cls = KroneckerConfig
    config: KroneckerConfig

    def attach(self, components: Any) -> None:
        self.factors: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        self.handles = []
        for path, layer in find_linears(components.unet, split_targets(self.config.target_modules)).items():
            a1, a2, b1, b2 = kron_shape(layer.out_features, layer.in_features, self.config.factor)
            device = layer.weight.device
            w1 = nn.Parameter(torch.randn(a1, a2, device=device) / a1)  # A ~ N(0, 1/a1^2)
            w2 = nn.Parameter(torch.zeros(b1, b2, device=device))  # B = 0: dW = 0 at step 0
            self.factors[f"unet.{path}"] = (w1, w2)
            self.handles.append(add_output_delta(layer, partial(kron_apply, w1=w1, w2=w2)))

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        out = {}
        for module, (w1, w2) in self.factors.items():
            out[f"{module}.lokr_w1"], out[f"{module}.lokr_w2"] = w1, w2
        return out

    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {m: torch.kron(w1, w2).detach().float() for m, (w1, w2) in self.factors.items()}  # (d_out, d_in)

    def export(self) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
        tensors = {k: p.detach().float().cpu().clone() for k, p in self.trainable_tensors().items()}
        ranks = {m: max(*w1.shape, *w2.shape) for m, (w1, w2) in self.factors.items()}
        lokr = {"decompose_both": False, "decompose_factor": self.config.factor, "use_effective_conv2d": False}
        meta = self.meta(peft_type="LOKR", ranks=ranks, alphas={m: float(r) for m, r in ranks.items()}, lokr=lokr)
        return tensors, meta


def kron_shape(out_features: int, in_features: int, factor: int) -> tuple[int, int, int, int]:
    """(a1, a2, b1, b2) with a1 b1 = d_out, a2 b2 = d_in, exactly as PEFT's LoKr lays out w1 (a1, a2), w2 (b1, b2)."""
    a1, b1 = factorization(out_features, factor)
    a2, b2 = factorization(in_features, factor)
    return a1, a2, b1, b2


def kron_apply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(w1 (x) w2) x for x of shape (..., a2 * b2): build dW = A (x) B (d_out, d_in) once per call and apply it.

    vec(w1 X w2^T) would avoid building dW, but as a batch of tiny matmuls it runs tens of times slower on a CPU
    than one GEMM with the rebuilt weight (measured with `studio bench train`), as PEFT and LyCORIS also do.
    """
    return torch.nn.functional.linear(x, torch.kron(w1, w2).to(x.dtype))  # (..., d_out)
