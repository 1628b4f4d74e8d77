"""DiffuseKronA: a Kronecker-product adapter on the UNet and text encoder (Marjit et al., arXiv:2402.17412).

Paper section 3.2: dW = A (x) B with A in R^{a1 x a2}, B in R^{b1 x b2}, a1 b1 = d_out, a2 b2 = d_in, added in
parallel to the layer (the paper keeps the text encoder frozen; see Defaults). Scale 1. Init as the authors' code:
A ~ N(0, 1/a1^2), B = 0, so training starts exactly at the base. A 3x3 convolution takes B of shape
(b1, b2, 3, 3) and dW = A (x) B of shape (d_out, d_in, 3, 3), PEFT LoKr's convolution layout
(`use_effective_conv2d=False`).

Modules. The paper adapts q, k, v and out of every attention (`kqvo`; the feed-forward layers doubled the
parameters without helping, App. D.1). On the embedded base that finds the bench's emblem in 15% of prompts (1000
steps, batch 4, judged at guidance 5): like DreamBooth-LoRA, it draws the outline and not the inner shape. With the
feed-forward layers and the ResNet convolutions (the DreamBooth-LoRA default targets) it finds it in 85% (guidance 2,
the base's recommendation), with 6% of that LoRA's parameters; `--target-modules to_q,to_k,to_v,to_out.0` is the
paper's choice.

Factor choice. Only a1 * a2 sets the parameter count (a1 a2 + d_out d_in / (a1 a2)); the paper's best pair is
(a1, a2) = (4, 64). The library stores these factors as LoKr `lokr_w1` (= A) and `lokr_w2` (= B), which PEFT and
LyCORIS rebuild with `decompose_factor=f` as (a1, b1) = factorization(d_out, f), (a2, b2) = factorization(d_in, f):
a square A (f x f) whenever f divides both dims. So `factor` is that f, computed per module with PEFT's own
`factorization`; f = 16 gives a1 a2 = 256, the parameter count of the paper's (4, 64), in a layout every LoKr
loader reads. The stored r = alpha = max(a1, a2, b1, b2) makes PEFT build both factors full at scale 1.

Defaults: f = 8 and lr 1e-3 (the top of the paper's stable range, 1e-4 to 1e-3, section 4.1), tuned on the bench:
with prior preservation on (the loop's default for an emblem) the hardest bench emblem went from 50% found (f 16,
lr 5e-4, 1000 steps of 4, no prior) to 85% (f 8, lr 1e-3, 1200 steps of 2 + 2 class images), at 12% of the default
DreamBooth-LoRA's parameters. The same adapter on the text encoders' attention (as DreamBooth-LoRA's
`--train-text-encoder`; the embedded base's text encoder never saw a trigger word) took another emblem of the
bench from 60% to 70% found. `--factor 16 --lr 5e-4 --target-modules to_q,to_k,to_v,to_out.0
--no-train-text-encoder` is the paper's recipe.
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
from trainers.method import (
    TEXT_ENCODERS,
    TEXT_TARGETS,
    UNET_TARGETS,
    Method,
    MethodConfig,
    add_output_delta,
    find_layers,
    split_targets,
)


@dataclass
class KroneckerConfig(MethodConfig):
    method: ClassVar[str] = "kronecker"
    min_images: ClassVar[int] = 3

    lr: float = field(default=1e-3, metadata={"help": "learning rate (DiffuseKronA section 4.1: 5e-4)"})
    factor: int = field(
        default=8,
        metadata={
            "help": "Kronecker factor f: A is f x f where f divides the layer's "
            "dims (PEFT/LyCORIS decompose_factor); -1: near sqrt(d)"
        },
    )
    target_modules: str = field(
        default=UNET_TARGETS, metadata={"help": "UNet layers to adapt, comma-separated name suffixes"}
    )
    train_text_encoder: bool = field(
        default=True, metadata={"help": "also adapt the text encoder(s)' attention (the paper keeps them frozen)"}
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
        plan = [("unet", self.config.target_modules)]
        if self.config.train_text_encoder:
            plan += [(name, TEXT_TARGETS) for name in TEXT_ENCODERS if getattr(components, name, None) is not None]
        layers = {
            f"{name}.{path}": layer
            for name, targets in plan
            for path, layer in find_layers(getattr(components, name), split_targets(targets)).items()
        }
        for module, layer in layers.items():
            conv = isinstance(layer, nn.Conv2d)
            if conv:
                d_out, d_in = layer.out_channels, layer.in_channels // layer.groups
            else:
                d_out, d_in = layer.out_features, layer.in_features
            a1, a2, b1, b2 = kron_shape(d_out, d_in, self.config.factor)
            device = layer.weight.device
            w1 = nn.Parameter(torch.randn(a1, a2, device=device) / a1)  # A ~ N(0, 1/a1^2)
            kernel = tuple(layer.kernel_size) if conv else ()
            w2 = nn.Parameter(torch.zeros(b1, b2, *kernel, device=device))  # B = 0: dW = 0 at step 0
            self.factors[module] = (w1, w2)
            apply = partial(kron_conv, layer=layer) if conv else kron_apply
            self.handles.append(add_output_delta(layer, partial(apply, w1=w1, w2=w2)))

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        out = {}
        for module, (w1, w2) in self.factors.items():
            out[f"{module}.lokr_w1"], out[f"{module}.lokr_w2"] = w1, w2
        return out

    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {m: kron(w1, w2).detach().float() for m, (w1, w2) in self.factors.items()}  # (d_out, d_in[, kh, kw])

    def export(self) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
        tensors = {k: p.detach().float().cpu().clone() for k, p in self.trainable_tensors().items()}
        ranks = {m: max(*w1.shape, *w2.shape[:2]) for m, (w1, w2) in self.factors.items()}
        lokr = {"decompose_both": False, "decompose_factor": self.config.factor, "use_effective_conv2d": False}
        meta = self.meta(peft_type="LOKR", ranks=ranks, alphas={m: float(r) for m, r in ranks.items()}, lokr=lokr)
        return tensors, meta


def kron_shape(out_features: int, in_features: int, factor: int) -> tuple[int, int, int, int]:
    """(a1, a2, b1, b2) with a1 b1 = d_out, a2 b2 = d_in, exactly as PEFT's LoKr lays out w1 (a1, a2), w2 (b1, b2)."""
    a1, b1 = factorization(out_features, factor)
    a2, b2 = factorization(in_features, factor)
    return a1, a2, b1, b2


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """A (x) B; for a convolution B is (b1, b2, kh, kw) and A (x) B is (a1 b1, a2 b2, kh, kw), as PEFT LoKr has it."""
    return torch.kron(w1[:, :, None, None], w2) if w2.dim() == 4 else torch.kron(w1, w2)


def kron_conv(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
    """The convolution of x (B, d_in, H, W) with dW = A (x) B, on the layer's stride, padding and dilation."""
    return torch.nn.functional.conv2d(
        x, kron(w1, w2).to(x.dtype), None, layer.stride, layer.padding, layer.dilation, layer.groups
    )  # (B, d_out, H', W')


def kron_apply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(w1 (x) w2) x for x of shape (..., a2 * b2): build dW = A (x) B (d_out, d_in) once per call and apply it.

    vec(w1 X w2^T) would avoid building dW, but as a batch of tiny matmuls it runs tens of times slower on a CPU
    than one GEMM with the rebuilt weight (measured with `studio bench train`), as PEFT and LyCORIS also do.
    """
    return torch.nn.functional.linear(x, torch.kron(w1, w2).to(x.dtype))  # (..., d_out)
