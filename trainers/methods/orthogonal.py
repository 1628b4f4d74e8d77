"""Orthogonal adaptation (Po, Yang, Aberman, Wetzstein, CVPR 2024, arXiv:2311.17047): adapters that merge by a sum.

An independent implementation: no public code exists for the paper. What follows its equations:

- The residual of concept i is a LoRA-like dW_i = A_i B_i^T (paper section 4, "Orthogonal Adaptation") with the
  input-side factor frozen; in PEFT's names dW = lora_B @ lora_A, lora_A (r, d_in) frozen, lora_B (d_out, r) trained
  from zero, so training starts at the base.
- Crosstalk of a merged layer on concept i's inputs is dW_j X_i; it vanishes on span(A_i) when A_j A_i^T = 0
  (paper eq. 6-7). The frozen factors are rows of one orthogonal basis O (d_in, d_in) per input width, drawn from a
  seed shared by every adapter of a base ("randomized orthogonal basis", section 4.2; QR of a Gaussian matrix),
  and each concept takes its own columns of it, so A_i A_j^T = 0 exactly for i != j.
- Merging is FedAvg-style summation, theta = theta_0 + sum_i lambda_i dW_i (eq. 1): `studio library merge A,B` of
  orthogonal adapters concatenates their ranks, which is that sum, exactly.

Ours, not the paper's: the columns are allocated by the library (disjoint blocks of `rank` columns, recorded in the
adapter's method config and checked on merge) instead of drawn at random (the paper's expected overlap r^2/d_in is
1.25 columns at d_in 320, r 20); convolutions are adapted too (LoCon layout: the basis spans in * kh * kw inputs).
Capacity: a layer with d_in inputs holds d_in // rank concepts (the embedded base's 64-wide layers: 4 at rank 16); the
library refuses a concept past it.

The text side is the paper's ED-LoRA part (section 4.2, after Mix-of-Show): the trigger's own rows of the token table
train (lr 5e-3, no weight decay), and the text encoders get no LoRA (`--train-text-encoder` adds it). The rows are a
LoRA on `token_embedding` whose frozen down-projection is the one-hot rows of the trigger's token ids: the table's
input is a one-hot token, so its basis is the identity and a concept owning its trigger's columns leaves every other
token's embedding exact. The library refuses to sum two adapters whose rows move the same token (the same trigger).
Ours: the rows are the trigger's existing token ids, where Mix-of-Show adds new tokens (one per layer), so a trigger
that is a common word piece moves that piece in other prompts too (a made-up trigger like `sks` does not).

Measured (`studio bench merge`, two evaluation emblems at the defaults, 20 prompts each, 20 steps, 2 threads, one
run): found alone 0.85 and 0.90, in the plain sum 0.75 and 0.70 (drops 0.10 and 0.20); DreamBooth-LoRA beside it 0.90
and 0.85 alone, 0.75 and 0.65 summed. Both emblems in one prompt, plainly sampled: 0.00 for either sum; with regional
sampling (`--composer multidiffusion`, the paper's multi-concept setting): 0.62 with the orthogonal sum, 0.50 with
DreamBooth-LoRA's. Before the trigger rows (orthogonal LoRA on the text encoders' attention, as DreamBooth-LoRA's):
0.70 and 0.85 alone, 0.35 and 0.60 summed; with neither rows nor a text-encoder LoRA 0.80/0.75 -> 0.50/0.25; rows
beside the text-encoder LoRA 0.75/1.00 -> 0.30/0.90; rows with the UNet at a tenth of the rate (1e-4, towards the
paper's 1e-5) 0.15/0.00 alone; rows with LoRA on the cross-attention keys and values only 0.30/0.00 alone; rows
with the convolutions and cross-attention keys and values 0.55/0.45 -> 0.45/0.45; rows without the feed-forward
layers 0.80/0.90 -> 0.55/0.50 (worse: the other layers then carry the concept and its crosstalk); rows at rank 4
0.35/0.40 -> 0.20/0.50 and at rank 8 0.40/0.80 -> 0.65/0.90 (no drop, a weaker emblem alone; 20 prompts carry a
standard error near 0.1, so the default stays 16 until a longer run decides). So the
text encoders' LoRA was the larger share of the crosstalk, and the rows carry what it did. What remains is in the
UNet: loading one emblem's adapter with parts of the other's (before the rows), its 576-wide ResNet convolutions and
its cross-attention keys and values (text inputs, where the triggers differ) cost nothing (0.85 -> 0.85, 0.95), its
feed-forward layers 0.20, self-attention and projections 0.05-0.10 each. The paper's argument needs concept i's
features to avoid span(A_j); on 64-192-wide image features of two similar emblems they do not. Neither remedy tried
kept the identity: rank width / 16 on narrow layers (the paper's ratio at its narrowest layer) found 0.25/0.65 alone
and still dropped 0.40; adapting only the convolutions and cross-attention keys and values found 0.15/0.35 alone
(drops 0.10/0.15).

With the trigger rows, on the wide-input and text-fed layers only (20 prompts each, alone -> summed): convolutions,
`ff.net.2` (inputs 4x the width) and cross-attention keys/values, lr 1e-3: 0.60/0.60 -> 0.70/0.55; the same at lr
2e-3: 0.95/0.80 -> 0.70/0.75; convolutions and cross-attention keys/values at 2e-3: 0.90/0.65 -> 0.70/0.60. Part by
part (one emblem's adapter plus one part of the other's), every part costs 0-15 points and all of them 20-25: the
crosstalk is spread over the layers, not held by one kind. Summed at lambda 0.6 / 0.8 / 1.2 / 1.5 (the paper merges
at 0.6): 0.00/0.00, 0.30/0.05, 0.75/0.85, 0.80/0.50, against 0.95/0.80 alone at 1: the adapters sit near a cliff of
strength. Rank 8 at lr 2e-3 (145 s per emblem): 0.60/1.00 alone -> 0.75/0.75 summed. In every setting tried with the
trigger rows, the sum finds the weaker of its two emblems in 55-75% of prompts, however strong each is alone. Nor is
the text-fed path free of crosstalk once it carries the concept: the rows with cross-attention keys and values only,
at lr 5e-3 (rows 1e-2, 110-125 s per emblem), found 0.60/0.40 alone and 0.25/0.05 summed. A concept's key/value
delta reads every token's state, and most tokens (`emblem`, the places, the backgrounds) are the same in both
concepts' prompts; only the trigger differs. The paper's two tokens per concept (triggers of two made-up words,
`sks olis` and `mfw tpl`, rows at 1e-2) with the UNet at a lower rate: lr 3e-4, 700 steps: 0.50/0.75 -> 0.60/0.75; lr
5e-4: 0.60/1.00 -> 0.65/0.80; lr 3e-4, 1400 steps (315 s per emblem): 0.75/1.00 -> 0.65/0.65; rank 8 at lr 1e-3:
0.30/0.75 -> 0.45/0.95, at 2e-3: 0.45/0.95 -> 0.65/0.85; the paper's UNet rate, 1e-5, with the two-word rows at 2e-2:
0.05/0.00 alone (the rows alone do not carry an emblem on this base). A weak emblem gains in the sum and a strong one
loses; the longer the UNet trains, the stronger each emblem alone and the more of it the other one loses.
DreamBooth's class prior on the concept's own class (class prompts `a large emblem on the {place} on a {bg}
background`, the instance prompts without the trigger, in place of random scenes), meant to key each delta on its
trigger: 0.80/0.40 -> 0.25/0.40, against 0.85/0.90 -> 0.75/0.70 for the defaults in the same session (which repeat the
figures above exactly). Judged on 60 images per emblem (`studio bench merge --method orthogonal --draws 3`,
each prompt at 3 seeds, alone and in the sum on the same seeds), the defaults find 0.85/0.95 alone and 0.70/0.63
summed: drops of 0.15 and 0.32, each with a paired standard error of 0.07; both emblems with regional sampling 0.62.
Two DreamBooth-LoRAs in the same run: 0.92/0.93 alone, 0.77/0.68 summed (drops 0.15 and 0.25, s.e. 0.05 and 0.07):
orthogonality buys nothing measurable here. The premise itself, measured in that run (`benches.crosstalk`: rho, the
other adapter's residual on an emblem's layer inputs over its own, 8 prompts per emblem): 0.93 and 0.97 (each kind of
layer 0.84-1.10, cross-attention keys and values 0.97-1.05), against DreamBooth-LoRA's 0.91 and 0.90. dW_j X_i ~ 0
does not hold here: the other residual fires on each emblem as hard as its own, as a plain LoRA's does. The text side
cannot take the concept off the UNet: the base draws no emblem from words (each bench emblem's look written out in
place of its trigger, `a large emblem, a black diamond inside a green star with a red dot, on the left ...`, found in
0 of 20 prompts for both, places and backgrounds kept), so the emblem lives in UNet residuals whose inputs both
emblems share.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from studio.errors import StudioError
from studio.library.meta import AdapterMeta
from trainers.method import TEXT_ENCODERS, MethodConfig
from trainers.methods.dreambooth_lora import ADAPTER, DreamBoothLoRA, DreamBoothLoRAConfig


@dataclass
class OrthogonalConfig(DreamBoothLoRAConfig):
    method: ClassVar[str] = "orthogonal"

    lr: float = field(default=1e-3, metadata={"help": "learning rate of the trained (up) factors"})
    basis_seed: int = field(default=0, metadata={"help": "seed of the shared orthogonal bases (one per input width; "
                                                         "every adapter meant to merge uses the same)"})
    first_column: int | None = field(default=None, metadata={
        "help": "first of this adapter's `rank` basis columns; default: the library allocates free ones"})
    train_text_encoder: bool = field(default=False, metadata={
        "help": "also train orthogonal LoRA on the text encoders' attention (off: the trigger rows carry the text "
                "side, and the encoders' LoRA was the larger share of a sum's crosstalk)"})
    trigger_rows: bool = field(default=True, metadata={
        "help": "train the trigger's own rows of the token table (the paper's ED-LoRA text side)"})
    embedding_lr: float = field(default=5e-3, metadata={
        "help": "learning rate of the trigger rows (the paper: 1e-3 for its text embeddings), no weight decay"})
    trigger: str | None = field(default=None, metadata={"help": "whose rows train; default: the run's --trigger"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.first_column is not None and self.first_column < 0:
            raise StudioError(f"--first-column must be 0 or more, got {self.first_column}")
        if self.embedding_lr <= 0:
            raise StudioError(f"--embedding-lr must be positive, got {self.embedding_lr}")


@functools.lru_cache(maxsize=32)
def orthogonal_basis(width: int, seed: int) -> torch.Tensor:
    """O (width, width), orthogonal, the same for every caller with (width, seed): QR of a seeded Gaussian matrix,
    signs fixed by R's diagonal so that O is unique (Mezzadri's recipe for a Haar-distributed O)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + width)
    gaussian = torch.randn(width, width, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float()  # (width, width): columns orthonormal


class Orthogonal(DreamBoothLoRA):
    config_cls = OrthogonalConfig
    config: OrthogonalConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self.rows: dict[str, nn.Module] = {}  # `<component>.<path>` -> the token table's LoRA layer, after attach

    @classmethod
    def claim(cls, config: MethodConfig, library: Any, name: str) -> MethodConfig:
        """The config with this adapter's basis columns allocated by the library (kept when already given)."""
        assert isinstance(config, OrthogonalConfig)
        if config.first_column is not None:
            return config
        from studio.library.orthogonal import free_columns

        return replace(config, first_column=free_columns(library, name, config.basis_seed, config.rank))

    def attach(self, components: Any) -> None:
        c = self.config
        if c.first_column is None:
            raise StudioError("orthogonal adaptation needs its basis columns; train through trainers.train, which "
                              "allocates them, or pass --first-column")
        super().attach(components)
        stop = c.first_column + c.rank
        with torch.no_grad():
            for module, layer in self._layers().items():
                down = layer.lora_A[ADAPTER].weight  # (r, d_in) or (r, in, kh, kw)
                width = down[0].numel()
                if stop > width:
                    raise StudioError(
                        f"{module} has {width} inputs: its basis holds {width // c.rank} concepts of rank "
                        f"{c.rank} and columns {c.first_column}-{stop - 1} do not fit; train with a lower --rank or "
                        "remove an orthogonal adapter of this base"
                    )
                rows = orthogonal_basis(width, c.basis_seed)[:, c.first_column:stop].T  # (r, width), orthonormal
                down.copy_(rows.reshape(down.shape).to(down.dtype))
                down.requires_grad_(False)
                nn.init.zeros_(layer.lora_B[ADAPTER].weight)  # dW = 0: training starts at the base
        self.rows = self._attach_rows(components) if c.trigger_rows else {}

    def _attach_rows(self, components: Any) -> dict[str, nn.Module]:
        """ED-LoRA's text side (Gu et al., Mix-of-Show, section 3.1, used by the paper's section 4.2) on the embedded
        table: a LoRA on each text encoder's `token_embedding` whose frozen down-projection is the one-hot rows of the
        trigger's token ids, so the trained up-projection B (dim, r) is exactly the trigger rows' change. In the
        paper's terms this is the token table's own orthogonal split: its input is one-hot, the identity basis, and a
        concept owning its trigger's columns leaves every other token's embedding exact."""
        c = self.config
        if not c.trigger:
            raise StudioError("orthogonal adaptation trains its trigger's rows and needs the trigger; train through "
                              "trainers.train (it passes --trigger) or pass --no-trigger-rows")
        rows: dict[str, nn.Module] = {}
        for name, tokenizer in zip(TEXT_ENCODERS, ("tokenizer", "tokenizer_2")):
            model, tok = getattr(components, name, None), getattr(components, tokenizer, None)
            if model is None or tok is None:
                continue
            ids = sorted(set(tok(c.trigger, add_special_tokens=False).input_ids))
            config = LoraConfig(r=len(ids), lora_alpha=len(ids), target_modules=["token_embedding"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PEFT notes the text-encoder LoRA already under this adapter name
                inject_adapter_in_model(config, model, adapter_name=ADAPTER)
            for path, layer in model.named_modules():
                if path.endswith("token_embedding") and ADAPTER in getattr(layer, "lora_embedding_A", {}):
                    down, up = layer.lora_embedding_A[ADAPTER], layer.lora_embedding_B[ADAPTER]  # (r, vocab), (dim, r)
                    with torch.no_grad():
                        down.zero_()
                        down[torch.arange(len(ids)), torch.tensor(ids)] = 1.0  # one-hot rows of the trigger's ids
                        up.zero_()  # the table is exact at the start
                    down.requires_grad_(False)
                    up.requires_grad_(True)
                    rows[f"{name}.{path}"] = layer
            self.models.setdefault(name, model)
        return rows

    def card_notes(self) -> str:
        c = self.config
        text = ("the trigger's own rows of the token table (the paper's ED-LoRA text embeddings, on the trigger's "
                f"token ids, `{c.trigger}`)" if c.trigger_rows else "no trigger rows")
        if c.train_text_encoder:
            text += " and orthogonal LoRA on the text encoders' attention"
        return (
            "## Method\n\nOrthogonal adaptation (Po, Yang, Aberman, Wetzstein, CVPR 2024). This is an independent "
            "implementation: no code was published with the paper. It follows the paper's residual with a frozen "
            "input-side factor (section 4), frozen factors drawn from a shared randomized orthogonal basis per input "
            "width (section 4.2) and merging by summation (eq. 1). Its own choices: the library allocates disjoint "
            f"basis columns instead of random ones, and convolutions are adapted too. Text side: {text}.\n\n"
            f"Basis seed {c.basis_seed}, columns {c.first_column}-{(c.first_column or 0) + c.rank - 1} of each "
            "layer's basis; merge it with other orthogonal adapters of this base (other triggers) by `studio library "
            "merge A,B --name AB` (a plain sum), and place each concept of the sum with `studio compose --composer "
            "multidiffusion` and a prompt that puts each trigger's clause in its place.\n"
        )

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        out = {k: p for k, p in super().trainable_tensors().items() if k.endswith("lora_B.weight")}
        for module, layer in self.rows.items():
            out[f"{module}.lora_B.weight"] = layer.lora_embedding_B[ADAPTER]  # (dim, r): the trigger rows' change
        return out

    def trainable_parameters(self) -> list[dict[str, Any]]:
        rows = {id(layer.lora_embedding_B[ADAPTER]) for layer in self.rows.values()}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in rows]}
                  for g in super().trainable_parameters()]
        groups = [g for g in groups if g["params"]]
        if rows:  # textual-inversion practice: no weight decay pulling the rows back to the base embedding
            params = [layer.lora_embedding_B[ADAPTER] for layer in self.rows.values()]
            groups.append({"params": params, "lr": self.config.embedding_lr, "weight_decay": 0.0})
        return groups

    def delta_weights(self) -> dict[str, torch.Tensor]:
        out = super().delta_weights()
        for module, layer in self.rows.items():
            out[module] = layer.get_delta_weight(ADAPTER).detach().float()  # (vocab, dim), the table's shape
        return out

    def export(self) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
        layers = self._layers()
        tensors = {}
        for module, layer in layers.items():
            tensors[f"{module}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.detach().float().cpu().clone()
            tensors[f"{module}.lora_B.weight"] = layer.lora_B[ADAPTER].weight.detach().float().cpu().clone()
        for module, layer in self.rows.items():  # canonical keys: the table as a one-hot linear map
            tensors[f"{module}.lora_A.weight"] = layer.lora_embedding_A[ADAPTER].detach().float().cpu().clone()
            tensors[f"{module}.lora_B.weight"] = layer.lora_embedding_B[ADAPTER].detach().float().cpu().clone()
            layers[module] = layer
        ranks = {m: int(layer.r[ADAPTER]) for m, layer in layers.items()}
        alphas = {m: float(layer.lora_alpha[ADAPTER]) for m, layer in layers.items()}
        return tensors, self.meta(peft_type="LORA", ranks=ranks, alphas=alphas)
