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

Defaults: f = 4 and lr 6e-3, tuned on the adapter bench (prior preservation on, 700 steps of 2 + 2 class images,
judged at guidance 2), with the same adapter on the text encoders' attention as DreamBooth-LoRA's
`--train-text-encoder` (the embedded base's text encoder never saw a trigger word). The three bench emblems were
found in: f 8 at lr 1e-3 (1200 steps), 60-65%; f 4 at 5e-3, 80%, 95%, 95%; f 4 at 6e-3, 95% and 100% on the two
tried, the base's accuracy without the trigger within 1.5 points. The text encoders' MLPs (fc1, fc2) as well found
the emblem as often but moved it: 75% at the asked position for one emblem, 100% without them. Why above the
paper's range (section 4.1: 5e-4, stable to 1e-3, overfitting above): Adam moves each factor entry by about lr per
step, so dW = A (x) B moves by about lr |A| = lr / a1 per entry; the embedded base's layers are 64-192 wide, where a
LoRA of rank 16 is close to full rank and these small factors need the larger step. f 4 keeps 46% of the default
DreamBooth-LoRA's parameters (f 8: 12%, too few for the emblems' inner shapes in the CPU budget).
`--factor 16 --lr 5e-4 --target-modules to_q,to_k,to_v,to_out.0 --no-train-text-encoder` is the paper's recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from peft.tuners.lokr.layer import factorization
from torch import nn
from torch.nn.utils import parametrize

from studio.errors import StudioError
from studio.library.meta import AdapterMeta
from trainers.method import (
    TEXT_ENCODERS,
    TEXT_TARGETS,
    UNET_TARGETS,
    Method,
    MethodConfig,
    find_layers,
    split_targets,
)


@dataclass
class KroneckerConfig(MethodConfig):
    method: ClassVar[str] = "kronecker"
    min_images: ClassVar[int] = 3

    lr: float = field(default=6e-3, metadata={"help": "learning rate (DiffuseKronA section 4.1: 5e-4)"})
    factor: int = field(
        default=4,
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
            parametrize.register_parametrization(layer, "weight", KronDelta(w1, w2))  # W = W0 + A (x) B

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


class KronDelta(nn.Module):
    """The parametrization W0 -> W0 + A (x) B of a layer's weight (`torch.nn.utils.parametrize`).

    The layer then runs one GEMM or convolution with the summed weight. A second one with dW alone on the input (a
    forward hook, as LoRA's low-rank path is applied) costs as much as the base layer itself here, because dW is
    full-size: merging made a training step of the default Kronecker adapter 1.4x faster (2 CPU threads, side by
    side). The paper's reshape trick, vec(A X B^T), avoids building dW, but as a batch of tiny matmuls it runs tens of
    times slower on a CPU than one GEMM with the rebuilt weight, as PEFT and LyCORIS also find.
    """

    def __init__(self, w1: nn.Parameter, w2: nn.Parameter) -> None:
        super().__init__()
        self.w1, self.w2 = w1, w2  # (a1, a2), (b1, b2[, kh, kw])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return KronAdd.apply(weight, self.w1.to(weight.dtype), self.w2.to(weight.dtype))  # (d_out, d_in[, kh, kw])


class KronAdd(torch.autograd.Function):
    """W0 + A (x) B in one pass, with the factors' gradients as two contractions of the weight's gradient G.

    With G viewed as (a1, b1, a2, b2[, k]): dL/dA[i, j] = sum_kl G[i, k, j, l] B[k, l] and
    dL/dB[k, l] = sum_ij G[i, k, j, l] A[i, j]. Autograd through `torch.kron` gets the same by broadcasting G against
    each factor first, a full-size product per factor: this is 1.3-2x faster on the embedded base's layers.
    W0 gets G itself, and only when it requires one (the base is frozen in training).
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        (a1, a2), (b1, b2) = w1.shape, w2.shape[:2]
        b = w2.reshape(b1, b2, -1)  # (b1, b2, k): k = kh kw for a convolution, 1 for a linear layer
        ctx.save_for_backward(w1, b)
        ctx.w2_shape = w2.shape
        out = torch.addcmul(weight.reshape(a1, b1, a2, b2, -1), w1.view(a1, 1, a2, 1, 1), b.view(1, b1, 1, b2, -1))
        return out.view(weight.shape)  # (a1 b1, a2 b2[, kh, kw])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        w1, b = ctx.saved_tensors
        g = grad.reshape(w1.shape[0], b.shape[0], w1.shape[1], b.shape[1], -1)  # (a1, b1, a2, b2, k)
        grad_w1 = torch.einsum("ikjlm,klm->ij", g, b)  # (a1, a2)
        grad_w2 = torch.einsum("ikjlm,ij->klm", g, w1).reshape(ctx.w2_shape)  # (b1, b2[, kh, kw])
        return (grad if ctx.needs_input_grad[0] else None), grad_w1, grad_w2
