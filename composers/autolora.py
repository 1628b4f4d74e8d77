"""AutoLoRA gated fusion: per-layer, per-timestep gates over the retrieved adapters (Li et al., arXiv:2508.02107, 3.2).

At every adapted UNet layer, with h0 = W0 x + b and d_i = s_i B_i A_i x the delta of adapter i (its scale s_i is the
set's weight x alpha / r):

    g_i = sigmoid(LN_0(h0) * w_b + LN_1(d_i) * w_l + (LN_0(h0) * LN_1(d_i)) * w_c + beta(t))   (element-wise)
    h   = h0 + sum_i w_o * g_i * d_i

(the paper's fusion; its released `LoraMerger`). w_b, w_l, w_c, beta and w_o are vectors over the layer's output
channels, shared by the adapters of the layer; LN_0 and LN_1 are LayerNorms over those channels. The adapters' list
ends with the paper's Global LoRA: the rank-q truncated SVD of the sum of the deltas (exact here; DiffSynth's
`FluxLoRAFuser` approximates it with `torch.svd_lowrank`, q = 4), gated like the others.

Ours, not the paper's:
- beta(t) = beta + W_t phi(t), phi(t) = cos(pi k t / 1000) for k = 1..4, W_t (d_out, 4): the gate is per timestep
  explicitly (the paper's released gate has no t input; FLUX's activations carry t implicitly).
- The gate starts as the uniform merge instead of the paper's random init: w_b = w_l = w_c = W_t = 0, beta = 0, so
  every g_i = 1/2, and w_o = 2 / (1 + [global LoRA]), so h0 + sum_i d_i (+ the global's share). Training refines it.
- Text encoders keep every adapter at its weight (FLUX's LoRAs, the paper's, adapt the DiT only).

Gates are trained once per base (`composers.autolora_train`) and kept as safetensors next to the base's assets,
`assets/autolora-gate/<base>.safetensors`; a layer without a trained gate uses the merge-equivalent init (none ships
for studio-tiny: trained gates did worse than the init there, see `composers.autolora_train`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from composers.activation import wrap_forward
from composers.adapter_set import AdapterSet
from composers.concepts import trigger_positions
from composers.handle import Handle
from studio.errors import StudioError
from studio.paths import ASSETS


GATE_DIR = ASSETS / "autolora-gate"
TIME_FEATURES = 4


@dataclass
class AutoLoRAConfig:
    k: int = field(default=2, metadata={"help": "adapters retrieved when none are named (paper demos: 1 to 3)"})
    gate: str | None = field(default=None, metadata={"help": "gate file; default the base's shipped gate"})
    global_rank: int = field(default=4, metadata={"help": "rank of the Global LoRA (0: none; DiffSynth: 4)"})

    def __post_init__(self) -> None:
        if self.k < 1:
            raise StudioError(f"--k must be at least 1, got {self.k}")
        if self.global_rank < 0:
            raise StudioError(f"--global-rank must be 0 or more, got {self.global_rank}")


def time_features(t: torch.Tensor) -> torch.Tensor:
    """phi(t): (TIME_FEATURES,) cosines of the timestep (0..1000), on its device (on a GPU, `float(t)` would wait
    for it, and every gate would copy phi from the host)."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)[0]
    k = torch.arange(1, TIME_FEATURES + 1, dtype=torch.float32, device=t.device)
    return torch.cos(math.pi * k * t / 1000.0)


class Gate(nn.Module):
    """The gate of one layer with `d_out` output channels (the paper's LoraMerger)."""

    def __init__(self, d_out: int, with_global: bool) -> None:
        super().__init__()
        self.ln0, self.ln1 = nn.LayerNorm(d_out), nn.LayerNorm(d_out)
        self.w_b, self.w_l, self.w_c = (nn.Parameter(torch.zeros(d_out)) for _ in range(3))
        self.beta = nn.Parameter(torch.zeros(d_out))
        self.w_t = nn.Parameter(torch.zeros(d_out, TIME_FEATURES))
        self.w_o = nn.Parameter(torch.full((d_out,), 2.0 / (1 + int(with_global))))

    def forward(self, h0: torch.Tensor, deltas: list[torch.Tensor], phi: torch.Tensor) -> torch.Tensor:
        # h0 and each delta: (..., d_out) channels last; phi (TIME_FEATURES,)
        n0 = self.ln0(h0)
        base = n0 * self.w_b
        beta = self.beta + self.w_t @ phi.to(self.w_t)  # (d_out,)
        out = h0
        for d in deltas:
            n1 = self.ln1(d)
            g = torch.sigmoid(base + n1 * self.w_l + n0 * n1 * self.w_c + beta)  # Eq. of section 3.2: g_i
            out = out + self.w_o * g * d
        return out


def gate_key(module: str) -> str:
    return module.replace(".", "_")


class GatedFusion(nn.Module):
    """Every layer's gate, keyed by the UNet module path."""

    def __init__(self, layers: dict[str, int], with_global: bool) -> None:
        super().__init__()
        self.gates = nn.ModuleDict({gate_key(m): Gate(d, with_global) for m, d in layers.items()})

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from studio import atomic

        atomic.atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                                                        str(tmp)))

    def load_shipped(self, path: Path) -> int:
        """Load the gates of `path` that match this fusion's layers; returns how many layers got a trained gate."""
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (OSError, ValueError) as err:
            raise StudioError(f"cannot read the AutoLoRA gate {path} ({err}); train it again") from None
        own = self.state_dict()
        found = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(found, strict=False)
        return len({k.split(".")[1] for k in found})


def _channels_last(y: torch.Tensor) -> torch.Tensor:
    return y.movedim(1, -1) if y.dim() == 4 else y  # conv outputs (B, C, H, W) -> (B, H, W, C)


def _channels_back(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y.movedim(-1, 1) if like.dim() == 4 else y


def _delta(layer: BaseTunerLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    """d_i = s_i B_i A_i x for a LoRA layer; any other tuner type through its delta weight."""
    if hasattr(layer, "lora_A") and name in layer.lora_A:
        return layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](x))) * layer.scaling[name]
    base, weight = layer.get_base_layer(), layer.get_delta_weight(name)
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, weight.to(x), None, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, weight.to(x))


def _stacked_lora(layer: BaseTunerLayer, names: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """sum_n s_n B_n A_n as one product B A: B = [s_1 B_1 | ... | s_k B_k] (out, R), A = [A_1; ...; A_k] (R, in...),
    R = sum of the ranks; None unless every name is a plain LoRA of the layer (no DoRA, no other tuner type)."""
    lora_a, lora_b = getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {})
    if not all(n in lora_a and n in lora_b and not getattr(layer, "use_dora", {}).get(n, False) for n in names):
        return None
    bs = [lora_b[n].weight.detach().float().flatten(1) * layer.scaling[n] for n in names]  # (out, r_n)
    as_ = [lora_a[n].weight.detach().float().flatten(1) for n in names]  # (r_n, in * kh * kw)
    if any(b.shape[1] != a.shape[0] for b, a in zip(bs, as_)) or any(
            lora_b[n].weight.dim() == 4 and lora_b[n].weight.shape[2:] != (1, 1) for n in names):
        return None
    return torch.cat(bs, 1), torch.cat(as_, 0)


def _truncated_svd(layer: BaseTunerLayer, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u (out, k), s (k,), v (in, k) of the sum of the layer's deltas (flattened), exactly.

    For plain LoRAs from their factors: with B = Q_b R_b and A^T = Q_a R_a (thin QR), B A = Q_b (R_b R_a^T) Q_a^T, so
    the SVD of the small R x R core U' S V'^T gives u = Q_b U', v = Q_a V' and the same singular values as the dense
    SVD, in O((out + in) R^2) instead of O(out in min(out, in)). Two rank-8 LoRAs on a square layer, side by side
    on 2 CPU threads (median of 5): 33x faster at width 320, 54x at 640, 640x at 1280 (SD1.5's widths), so an SD1.5
    compose no longer spends most of a minute here. Any other delta (LoKr, DoRA) through the dense SVD of the summed
    delta weights."""
    stacked = _stacked_lora(layer, names)
    if stacked is not None:
        b, a = stacked
        qb, rb = torch.linalg.qr(b)  # (out, R), (R, R)
        qa, ra = torch.linalg.qr(a.T)  # (in, R), (R, R)
        uc, s, vhc = torch.linalg.svd(rb @ ra.T)  # (R, R), (R,), (R, R)
        return qb @ uc, s, qa @ vhc.T
    total = sum(layer.get_delta_weight(n).float() for n in names)  # (out, in[, kh, kw])
    u, s, vh = torch.linalg.svd(total.flatten(1), full_matrices=False)  # (out, k), (k,), (k, in)
    return u, s, vh.T


def _global_factors(layer: BaseTunerLayer, names: list[str], rank: int) -> tuple[nn.Module, nn.Module] | None:
    """The Global LoRA of a layer: the rank-`rank` SVD of the sum of its active deltas, as down/up modules."""
    if rank < 1:
        return None
    base = layer.get_base_layer()
    # The exact truncated SVD: DiffSynth's torch.svd_lowrank draws random projections from the global RNG, so the
    # Global LoRA, and every image, depended on what ran before.
    u, s, v = _truncated_svd(layer, names)  # (out, k), (k,), (in, k)
    q = min(rank, s.numel())
    u, s, v = u[:, :q], s[:q], v[:, :q]  # (out, q), (q,), (in, q)
    dtype = base.weight.dtype
    if isinstance(base, nn.Conv2d):
        down = nn.Conv2d(base.in_channels, q, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
        up = nn.Conv2d(q, base.out_channels, 1, bias=False)
        down.weight.data = (v.T * s[:, None]).reshape(q, *base.weight.shape[1:]).to(dtype)
        up.weight.data = u.reshape(*u.shape, 1, 1).to(dtype)
    else:
        down, up = nn.Linear(base.in_features, q, bias=False), nn.Linear(q, base.out_features, bias=False)
        down.weight.data, up.weight.data = (v.T * s[:, None]).to(dtype), u.to(dtype)
    return down.to(base.weight.device), up.to(base.weight.device)


def gated_layers(unet: nn.Module, names: list[str]) -> dict[str, BaseTunerLayer]:
    """The UNet's tuner layers that hold any of `names`, by module path."""
    out = {}
    for path, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer) and any(
            n in getattr(module, a) for n in names for a in module.adapter_layer_names
        ):
            out[path] = module
    return out


def out_channels(layer: BaseTunerLayer) -> int:
    base = layer.get_base_layer()
    return base.out_channels if isinstance(base, nn.Conv2d) else base.out_features


def install(unet: nn.Module, names: list[str], fusion: GatedFusion, global_rank: int) -> Handle:
    """Route each adapted UNet layer through its gate; the current timestep comes from a wrapper on the UNet."""
    state: dict[str, Any] = {"phi": time_features(torch.tensor(999.0))}
    handle = Handle("autolora", state=state)

    def unet_forward(original: Any, sample: torch.Tensor, timestep: Any, *args: Any, **kw: Any) -> Any:
        state["phi"] = time_features(torch.as_tensor(timestep, device=sample.device))
        return original(sample, timestep, *args, **kw)

    handle.add(wrap_forward(unet, unet_forward))
    for path, layer in gated_layers(unet, names).items():
        present = [n for n in names if any(n in getattr(layer, a) for a in layer.adapter_layer_names)]
        gate = fusion.gates[gate_key(path)]
        glob = _global_factors(layer, present, global_rank) if len(present) > 1 else None

        def forward(original: Any, x: torch.Tensor, *args: Any, layer: BaseTunerLayer = layer, gate: Gate = gate,
                    present: list[str] = present, glob: Any = glob, **kw: Any) -> torch.Tensor:
            h0 = layer.get_base_layer()(x, *args, **kw)  # W0 x + b
            deltas = [_delta(layer, n, x) for n in present]
            if glob is not None:
                deltas.append(glob[1](glob[0](x)))
            out = gate(_channels_last(h0), [_channels_last(d.to(h0)) for d in deltas], state["phi"])
            return _channels_back(out, h0)

        handle.add(wrap_forward(layer, forward))
    return handle


def gate_path(pipe: Any, config: AutoLoRAConfig) -> Path | None:
    """The gate file: the config's, else the base's shipped one (by the pipeline's model name), else none."""
    if config.gate:
        path = Path(config.gate)
        if not path.is_file():
            raise StudioError(f"no AutoLoRA gate at {path}; train one with composers.autolora_train or drop --gate")
        return path
    name = Path(str(getattr(pipe, "name_or_path", "") or getattr(pipe.config, "_name_or_path", ""))).name
    shipped = GATE_DIR / f"{name}.safetensors"
    return shipped if name and shipped.is_file() else None


def build_fusion(pipe: Any, names: list[str], config: AutoLoRAConfig) -> tuple[GatedFusion, int]:
    """The fusion over the layers `names` adapt, with trained gates loaded where the gate file has them."""
    layers = {p: out_channels(m) for p, m in gated_layers(pipe.unet, names).items()}
    fusion = GatedFusion(layers, config.global_rank > 0 and len(names) > 1)
    path = gate_path(pipe, config)
    trained = fusion.load_shipped(path) if path is not None else 0
    return fusion.to(pipe.unet.device), trained


def apply_autolora(pipe: Any, adapters: AdapterSet, config: AutoLoRAConfig) -> Handle:
    """Gated fusion of the set's adapters in the UNet (the adapters are loaded and active at their weights)."""
    fusion, trained = build_fusion(pipe, adapters.names, config)
    handle = install(pipe.unet, adapters.names, fusion, config.global_rank)
    handle.state.update(trained_layers=trained, layers=len(fusion.gates))
    return handle


def retrieved_set(prompt: str, config: AutoLoRAConfig, library: Any = None) -> tuple[str, AdapterSet]:
    """The prompt with the retrieved adapters' trigger words appended, and the top-k adapters by the prompt.

    PEFT holds one adapter type per layer, so after the best match only adapters of its type (LoRA or LoKr) are
    taken, best first."""
    from studio.library import Library
    from studio.library.retrieval import retrieve

    library = library or Library()
    found = retrieve(prompt, 4 * config.k, library=library)
    kind = library.get(found[0].name).meta.peft_type
    names = [r.name for r in found if library.get(r.name).meta.peft_type == kind][: config.k]
    # each trigger once: a merged adapter carries its parts' triggers, which other retrieved adapters may share
    triggers = list(dict.fromkeys(t for n in names for t in library.get(n).meta.trigger_words
                                  if not trigger_positions(prompt, [t])))
    text = f"{prompt}, {' '.join(triggers)}" if triggers else prompt
    return text, AdapterSet(names, [1.0] * len(names)).resolve(library)
