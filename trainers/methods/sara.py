"""SaRA: train the pretrained weights whose magnitude is below a threshold (Hu et al., ICLR 2025, arXiv:2409.06633).

What follows the paper:

- Selection: every parameter tensor of the trained model, with one global absolute threshold, M = |P0| < theta
  (the paper's "temporarily ineffective" parameters; theta = 2e-3, its default, selects 5.5% of the embedded base's
  UNet, as 5.8% of SD 1.5's). Only P[M] trains; every other entry stays bit-identical.
- Unstructural backpropagation: the optimizer sees one flat tensor per parameter, P_learn = P[M], so gradients and
  AdamW's moments exist for the selected entries only. The forward writes P[M] = P_learn into the frozen weight in
  place and runs the layer unchanged (`SparseWrite`: no second copy of the weight); the backward hands P_learn the
  selected entries of the weight's gradient, which exists for one layer at a time.
- Low-rank constraint: L = L_diffusion + lambda_rank ||P_M||_* with P_M = P (.) M, the nuclear norm (sum of singular
  values, subgradient U V^T) of the masked parameter matrix; as the authors' code does, one 2-D weight (a
  convolution flattened to (out, in kh kw)) with more than 100 selected entries is taken per step, a different one
  each step (lambda_rank = 5e-3, the best of the paper's hyperparameter study; the authors' README gives 5e-4).
- Progressive parameter adjustment: after `progressive_step` steps (the paper: half of training) the mask becomes
  |P| < theta intersected with the first mask; entries that have grown past theta keep their trained value and stop
  training (`frozen`), the others train on with their Adam moments (the paper resets them; pytorch_optimizer's SaRA
  keeps them).

Ours, not the paper's: the text encoder(s) are trained the same way (the embedded base's text encoder never saw a
trigger word; `--no-train-text-encoder` gives the paper's UNet-only recipe); AdamW's weight decay is the loop's, on
P_learn as in the paper. The library stores the result as a sparse delta, P[M] - P0[M] at the selected flat indices
of each parameter (studio/library/sparse.py), so it loads at a weight, merges and exports like any adapter.

Defaults: theta 2e-3 and lambda_rank 5e-3 are the paper's. progressive_step 350 is half of the default 700 steps
(the paper's "half of training"; set it to half of --train-steps). lr 1.75e-3, 3.5x the paper's fit at theta
2e-3 (5e-4 for 5000 steps at batch 4), for the 700 steps of 2 + 2 images that fit the CPU budget, as the other
methods here run at 10x their papers' rates for the same reason; of the three rates measured (quality below), the
one that keeps every emblem and the least drift.

Cost (`studio bench train --method sara --method dreambooth_lora`, embedded base, batch 2 + 2, 2 threads, class
images cached, on a shared machine): 866,071 trained entries (0.65x the default DreamBooth-LoRA's parameters), peak
resident memory 1,075.7 MB against DreamBooth-LoRA's 1,115.4 MB, and 1.6x its seconds per step: every selected
layer computes its dense weight gradient in the backward (as full fine-tuning does; the paper's saving is memory).

Quality (`studio bench adapters --method sara --no-texture`, three evaluation emblems at the defaults, 2 threads, an
otherwise idle machine; found of 20 prompts, then trigger-free drift from the base's 0.995 single-object accuracy,
then training seconds): lambda_rank 5e-3 found 0.95, 1.00 and 1.00, drift +0.000, +0.030 and +0.030, 164-173 s (two
runs, the same figures). With the README's 5e-4 the same emblems were found 0.95, 0.95 and 1.00 and drifted +0.015,
+0.035 and +0.025 (200-217 s); the drift is the UNet's (the second emblem's text-encoder entries alone: +0.005, its
UNet entries alone: +0.030), so the paper's best lambda, whose low-rank pull acts mostly on the UNet (136 of the 148
matrices it draws from), is the default. On the second emblem alone: lambda 5e-2 found 0.90 with drift +0.020; twice
the prior-preservation weight +0.020 too, but it lost another emblem (found 0.55). Learning rates at lambda 5e-4:
2e-3 found 0.90, 1.00 and 0.95, drift +0.015, +0.040 and +0.025; 1.5e-3 0.75, 0.90 and 1.00, +0.020, +0.025 and
+0.025. Drift is judged on 50 prompts of four attributes (one seed each): its standard error is 1 to 2 points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from studio.errors import StudioError
from studio.library.meta import AdapterMeta
from studio.library.sparse import INDICES, VALUES
from trainers.method import TEXT_ENCODERS, Method, MethodConfig


MIN_RANK_ENTRIES = 100  # the authors' code: a weight joins the nuclear-norm draw with more than 100 selected entries


@dataclass
class SaRAConfig(MethodConfig):
    method: ClassVar[str] = "sara"
    min_images: ClassVar[int] = 3

    lr: float = field(default=1.75e-3, metadata={"help": "learning rate (the paper's fit: 1e-3 exp(-350 theta), "
                                                      "5e-4 at theta 2e-3)"})
    threshold: float = field(default=2e-3, metadata={"help": "train the weights with |w| below this (SaRA's theta)"})
    lambda_rank: float = field(default=5e-3, metadata={
        "help": "weight of the nuclear-norm low-rank loss (the paper's best; its README: 5e-4; 0: off)"})
    progressive_step: int = field(default=350, metadata={
        "help": "re-select the still-small weights after this many steps (the paper: half of training; 0: never)"})
    train_text_encoder: bool = field(default=True, metadata={
        "help": "also train the text encoder(s)' small weights (the paper trains the UNet only)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.threshold > 0:
            raise StudioError(f"--threshold must be positive, got {self.threshold}")
        if self.lambda_rank < 0:
            raise StudioError(f"--lambda-rank must be 0 or more, got {self.lambda_rank}")
        if self.progressive_step < 0:
            raise StudioError(f"--progressive-step must be 0 or more, got {self.progressive_step}")


def nuclear_norm(matrix: torch.Tensor) -> torch.Tensor:
    """||M||_*, the sum of M's singular values, differentiable (subgradient U V^T).

    A wide or tall M (a convolution flattened to (out, in kh kw): up to 192 x 1728 here) has the singular values of
    the small square R of its QR factorization (M^T = QR or M = QR, Q orthonormal columns), so one QR and a small
    SVD replace a wide SVD (3x faster). QR's backward needs R invertible: a rank-deficient M (a row with no selected
    entry) takes the plain SVD.
    """
    tall = matrix.T if matrix.shape[0] < matrix.shape[1] else matrix  # (long, short)
    if tall.shape[0] > tall.shape[1]:
        r = torch.linalg.qr(tall).R  # (short, short)
        diagonal = torch.diagonal(r).abs()
        if bool(diagonal.min() > 1e-3 * diagonal.max()):  # well conditioned: QR's backward is accurate
            return torch.linalg.svdvals(r).sum()
    return torch.linalg.svdvals(matrix).sum()


class SparseWrite(torch.autograd.Function):
    """W with W.flat[index] = learned, written in place (SaRA's unstructural backpropagation).

    The layer then runs on W itself; the gradient of `learned` is the weight's gradient at `index`. W is a frozen
    parameter and gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, learned: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        weight.view(-1).index_copy_(0, index, learned.to(weight.dtype))  # (numel,) <- (n,)
        ctx.save_for_backward(index)
        ctx.dtype = learned.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        return None, grad.reshape(-1).index_select(0, index).to(ctx.dtype), None  # (n,)


class SparseParam(nn.Module):
    """The parametrization of one parameter: P with P[M] = P_learn (`values`), or the frozen value of an entry that
    progressive re-selection has taken out of training (`active` False)."""

    def __init__(self, index: torch.Tensor, values: nn.Parameter) -> None:
        super().__init__()
        self.register_buffer("index", index, persistent=False)  # (n,) flat positions of M, increasing
        self.values = values  # (n,) P_learn, starts at P0[M]
        self.base = values.detach().clone()  # (n,) P0[M]
        self.active: torch.Tensor | None = None  # (n,) bool after re-selection
        self.frozen: torch.Tensor | None = None  # (n,) the values at re-selection

    def learned(self) -> torch.Tensor:
        if self.active is None:
            return self.values
        return torch.where(self.active, self.values, self.frozen)  # frozen entries get no gradient

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return SparseWrite.apply(weight, self.learned(), self.index)


class SaRA(Method):
    config_cls = SaRAConfig
    config: SaRAConfig

    def attach(self, components: Any) -> None:
        names = ["unet"]
        if self.config.train_text_encoder:
            names += [n for n in TEXT_ENCODERS if getattr(components, n, None) is not None]
        self.params: dict[str, SparseParam] = {}  # "<component>.<param path>" -> its parametrization
        self.shapes: dict[str, list[int]] = {}
        for component in names:
            model = getattr(components, component)
            for path, p in list(model.named_parameters()):
                owner_path, _, attr = path.rpartition(".")
                if attr not in ("weight", "bias"):
                    continue
                index = (p.detach().abs() < self.config.threshold).view(-1).nonzero().view(-1)  # (n,) M
                if index.numel() == 0:
                    continue
                values = nn.Parameter(p.detach().view(-1)[index].float().clone())  # (n,) P0[M]
                param = SparseParam(index, values)
                owner = model.get_submodule(owner_path) if owner_path else model
                parametrize.register_parametrization(owner, attr, param)
                self.params[f"{component}.{path}"] = param
                self.shapes[f"{component}.{path}"] = list(p.shape)
        if not self.params:
            raise StudioError(f"no weight is below --threshold {self.config.threshold:g}; raise it (SaRA: 2e-3)")
        # The nuclear-norm draw: matrices (linear and convolution weights, not embeddings) with enough entries.
        self.matrices = [k for k, p in self.params.items() if k.endswith(".weight") and len(self.shapes[k]) in (2, 4)
                         and "embedding" not in k and p.index.numel() > MIN_RANK_ENTRIES]

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        return {f"{k}.{VALUES}": p.values for k, p in self.params.items()}

    def regularizer(self, step: int) -> torch.Tensor | None:
        """lambda_rank ||P (.) M||_* of one weight, a different one each step (a pure function of the step)."""
        if not self.config.lambda_rank or not self.matrices:
            return None
        pick = int(torch.randint(len(self.matrices), (1,), generator=torch.Generator().manual_seed(step)))
        key = self.matrices[pick]
        param, shape = self.params[key], self.shapes[key]
        learned = param.learned()
        masked = torch.zeros(torch.Size(shape).numel(), device=learned.device, dtype=learned.dtype)
        masked = masked.index_put((param.index,), learned).view(shape[0], -1)  # P (.) M: (out, in[ kh kw])
        return self.config.lambda_rank * nuclear_norm(masked)  # gradient U V^T, on the entries of M

    def on_step_end(self, step: int) -> None:
        if step + 1 != self.config.progressive_step:
            return
        with torch.no_grad():  # progressive parameter adjustment: M <- M0 and |P| < theta
            for param in self.params.values():
                learned = param.learned().detach()
                still = learned.abs() < self.config.threshold
                param.active = still if param.active is None else still & param.active
                param.frozen = learned.clone()

    def reselected(self) -> bool:
        return any(p.active is not None for p in self.params.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        for k, p in self.params.items():
            if p.active is not None:
                state[f"reselected.{k}.active"], state[f"reselected.{k}.frozen"] = p.active.clone(), p.frozen.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith("reselected.")})
        for k, p in self.params.items():
            if f"reselected.{k}.active" in state:
                p.active = state[f"reselected.{k}.active"].to(p.values.device)
                p.frozen = state[f"reselected.{k}.frozen"].to(p.values.device)

    def deltas(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`<component>.<param>` -> (flat indices (n,), P[M] - P0[M] (n,)), float32 on the CPU."""
        return {k: (p.index.cpu(), (p.learned().detach() - p.base).float().cpu()) for k, p in self.params.items()}

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """The dense dW of every weight (biases and norms' deltas are not weights of a module: see `export`)."""
        out = {}
        for key, (index, delta) in self.deltas().items():
            if key.endswith(".weight"):
                dense = torch.zeros(torch.Size(self.shapes[key]).numel()).index_put_((index,), delta)
                out[key.removesuffix(".weight")] = dense.view(self.shapes[key])
        return out

    def export(self) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
        tensors = {}
        for key, (index, delta) in self.deltas().items():
            tensors[f"{key}.{INDICES}"] = index.to(torch.int32)
            tensors[f"{key}.{VALUES}"] = delta
        selected = sum(p.index.numel() for p in self.params.values())
        trained = sum(int(p.active.sum()) if p.active is not None else p.index.numel() for p in self.params.values())
        sparse = {"threshold": self.config.threshold, "shapes": self.shapes, "selected": selected,
                  "still_training_at_end": trained}
        return tensors, self.meta(peft_type="SPARSE", sparse=sparse)

    def card_notes(self) -> str:
        c = self.config
        selected = sum(p.index.numel() for p in self.params.values())
        total = sum(torch.Size(s).numel() for s in self.shapes.values())
        return (
            "## Method\n\nSaRA (Hu et al., ICLR 2025): the pretrained weights with |w| < "
            f"{c.threshold:g} were trained in place ({selected:,} entries of {len(self.params)} tensors, "
            f"{selected / max(total, 1):.1%} of them), with the nuclear-norm low-rank loss (lambda {c.lambda_rank:g}) "
            f"and progressive re-selection after {c.progressive_step} steps. Stored as a sparse delta: for each "
            "parameter, `<param>.indices` (int32 flat positions) and `<param>.values` (the change at them); load "
            "it with `studio.load_adapters`, merge it by `studio library merge` (an exact sum) or write the full "
            "weight difference with `studio library export NAME --format diff`.\n"
        )
