"""Random, non-identity LoRA adapters for the tiny pipelines, written straight into the library (no training)."""

from __future__ import annotations

import torch

from studio.library import AdapterMeta, Library


def add_random_adapter(
    pipe, name: str, seed: int, *, kind: str = "unknown", rank: int = 2, scale: float = 0.3,
    trigger: str | None = None, triggers: list[str] | None = None,
) -> None:
    """A LoRA on every UNet attention projection and the first text-encoder layer, random A and B."""
    g = torch.Generator().manual_seed(seed)
    state_dict, ranks, alphas = {}, {}, {}
    targets = [("unet", n) for n, _ in pipe.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    te = pipe.text_encoder
    prefix = "text_model." if any(n.startswith("text_model.") for n, _ in te.named_modules()) else ""
    targets += [("text_encoder", f"{prefix}encoder.layers.0.self_attn.{p}") for p in ("q_proj", "v_proj")]
    for component, module in targets:
        layer = getattr(pipe, component).get_submodule(module)
        key = f"{component}.{module}"
        state_dict[f"{key}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * scale
        state_dict[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * scale
        ranks[key], alphas[key] = rank, float(rank)
    meta = AdapterMeta(kind=kind, ranks=ranks, alphas=alphas, trigger_words=triggers or [trigger or name])
    Library().add(name, state_dict, meta)
