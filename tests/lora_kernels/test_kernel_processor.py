"""FusedLoRAAttnProcessor on real diffusers `Attention` modules against AttnProcessor2_0 with merged weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from kernel_naive import naive, rand

from lora_kernels.dispatch import AdapterFactors, FusedLoRAAttnProcessor, region_scales


attention_processor = pytest.importorskip("diffusers.models.attention_processor")
D, D_CTX, HEADS, DIM_HEAD, K = 32, 24, 2, 16, 3


def _attention(cross: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    attn = attention_processor.Attention(
        query_dim=D, cross_attention_dim=D_CTX if cross else None, heads=HEADS, dim_head=DIM_HEAD, out_bias=True
    )
    attn.set_processor(attention_processor.AttnProcessor2_0())
    return attn.double().eval()


def _factors(cross: bool, seed: int = 1, out: bool = True) -> AdapterFactors:
    """K random adapters (nonzero A and B) with alpha / r scales; adapter 1 has no factors on to_k."""
    g = torch.Generator().manual_seed(seed)
    d_in = {"q": D, "k": D_CTX if cross else D, "v": D_CTX if cross else D, "out": HEADS * DIM_HEAD}
    d_out = {"q": HEADS * DIM_HEAD, "k": HEADS * DIM_HEAD, "v": HEADS * DIM_HEAD, "out": D}
    lists = {}
    for p in ("q", "k", "v", "out"):
        ranks = [2, 0 if p == "k" else 3, 4]
        lists[p] = [None if r == 0 else (rand(g, r, d_in[p]), rand(g, d_out[p], r) / 8, 8.0 / r) for r in ranks]
    return AdapterFactors(q=lists["q"], k=lists["k"], v=lists["v"], out=lists["out"] if out else None)


def _merged(attn: torch.nn.Module, factors: AdapterFactors, s: list[float]) -> torch.nn.Module:
    """A copy of attn with W + sum_k s_k scale_k B_k A_k on every projection the factors touch."""
    merged = copy.deepcopy(attn)
    layers = {"q": merged.to_q, "k": merged.to_k, "v": merged.to_v, "out": merged.to_out[0]}
    with torch.no_grad():
        for p, layer in layers.items():
            for k, t in enumerate(getattr(factors, p) or []):
                if t is not None:
                    getattr(layer, "base_layer", layer).weight.add_(s[k] * t[2] * t[1] @ t[0])  # PEFT: the base
    return merged


def _inputs(cross: bool, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    return rand(g, 2, 16, D), rand(g, 2, 5, D_CTX) if cross else None  # (B, N, d), (B, L, d_ctx)


def _run(attn: torch.nn.Module, processor: object, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    attn = copy.copy(attn)  # the same weights, its own processor
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(x, encoder_hidden_states=context)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_no_adapters_equals_attn_processor_2_0(cross: bool) -> None:
    attn, (x, context) = _attention(cross), _inputs(cross)
    want = _run(attn, attention_processor.AttnProcessor2_0(), x, context)
    got = _run(attn, FusedLoRAAttnProcessor(AdapterFactors(q=[], k=[], v=[])), x, context)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_constant_scales_equal_merged_weights(cross: bool) -> None:
    attn, factors, (x, context) = _attention(cross), _factors(cross), _inputs(cross)
    s = [0.8, -0.5, 1.2]
    want = _run(_merged(attn, factors, s), attention_processor.AttnProcessor2_0(), x, context)
    got = _run(attn, FusedLoRAAttnProcessor(factors, scales=torch.tensor(s, dtype=torch.float64)), x, context)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    plain = _run(attn, attention_processor.AttnProcessor2_0(), x, context)
    assert (got - plain).abs().max() > 1e-2  # the adapters matter


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_per_sample_scales_equal_each_sample_merged(cross: bool) -> None:
    attn, factors, (x, context) = _attention(cross), _factors(cross), _inputs(cross)
    s = torch.tensor([[1.0, 0.0, 0.3], [0.0, 1.5, -0.4]], dtype=torch.float64)  # (B, K): other adapters per sample
    got = _run(attn, FusedLoRAAttnProcessor(factors, scales=s), x, context)
    for b in range(2):
        ctx = None if context is None else context[b : b + 1]
        want = _run(_merged(attn, factors, s[b].tolist()), attention_processor.AttnProcessor2_0(), x[b : b + 1], ctx)
        torch.testing.assert_close(got[b : b + 1], want, rtol=1e-10, atol=1e-10)


def _by_hand(attn, factors, x, context, s_tok, s_ctx):  # noqa: ANN001, ANN202
    """Attention with every projection as the per-adapter loop: q (and self k, v, out) per token, k, v per s_ctx."""

    def project(layer: torch.nn.Linear, ts: list, inp: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        folded = [None if t is None else (t[0], t[1] * t[2]) for t in ts]
        return naive(inp, layer.weight, layer.bias, folded, s)

    ctx, sc = (x, s_tok) if context is None else (context, s_ctx[:, None].expand(-1, context.shape[1], -1))
    q = project(attn.to_q, factors.q, x, s_tok)
    k, v = project(attn.to_k, factors.k, ctx, sc), project(attn.to_v, factors.v, ctx, sc)
    heads = [t.view(2, -1, HEADS, DIM_HEAD).transpose(1, 2) for t in (q, k, v)]  # (B, heads, L, d)
    h = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(2, -1, HEADS * DIM_HEAD)  # (B, N, C)
    return project(attn.to_out[0], factors.out, h, s_tok)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_region_mask_per_token(cross: bool) -> None:
    """A (B, K, H, W) mask on 4D hidden states: each token's projections use its region's adapter."""
    attn, factors = _attention(cross), _factors(cross)
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(2, K, 4, 4, dtype=torch.float64)
    mask[0, 0, :, :2], mask[0, 2, :, 2:] = 1, 1  # sample 0: adapter 0 left, adapter 2 right
    mask[1, 1, :2], mask[1, 0, 2:] = 0.5, 1  # sample 1: adapter 1 at half weight on top, adapter 0 below
    x = rand(g, 2, D, 4, 4)  # (B, C, H, W), as a UNet's attention sees it before flattening
    context = rand(g, 2, 5, D_CTX) if cross else None
    got = _run(attn, FusedLoRAAttnProcessor(factors, scales=region_scales(mask)), x, context)
    s_tok = mask.flatten(2).transpose(1, 2)  # (B, N, K)
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
    want = _by_hand(attn, factors, tokens, context, s_tok, s_tok.amax(dim=1)).transpose(1, 2).reshape(2, D, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    uniform = _run(attn, FusedLoRAAttnProcessor(factors, scales=s_tok.mean(dim=1)), x, context)
    assert (got - uniform).abs().max() > 1e-3


def test_cached_weights_follow_in_place_updates() -> None:
    attn, factors, (x, _) = _attention(False), _factors(False), _inputs(False)
    processor = FusedLoRAAttnProcessor(factors, scales=0.5)
    _run(attn, processor, x, None)
    with torch.no_grad():
        attn.to_q.weight.mul_(-1.0)
    want = _run(_merged(attn, factors, [0.5] * K), attention_processor.AttnProcessor2_0(), x, None)
    torch.testing.assert_close(_run(attn, processor, x, None), want, rtol=1e-10, atol=1e-10)


def test_peft_wrapped_projections() -> None:
    """to_q/k/v wrapped by PEFT: merged PEFT adapters are part of the weight; active unmerged ones are refused."""
    peft = pytest.importorskip("peft")
    attn, (x, _) = _attention(False), _inputs(False)
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    peft.inject_adapter_in_model(config, attn)
    attn.double()
    with pytest.raises(ValueError, match="active, unmerged PEFT adapters"):
        _run(attn, FusedLoRAAttnProcessor(_factors(False)), x, None)
    for layer in (attn.to_q, attn.to_k, attn.to_v):
        layer.merge()
    factors = _factors(False, out=False)
    want = _run(attn, attention_processor.AttnProcessor2_0(), x, None)  # PEFT's merged forward
    torch.testing.assert_close(_run(attn, FusedLoRAAttnProcessor(factors, scales=0.0), x, None), want)
    s = [1.0, 0.5, 0.0]
    merged = _merged(attn, factors, s)
    want = _run(merged, attention_processor.AttnProcessor2_0(), x, None)
    got = _run(attn, FusedLoRAAttnProcessor(factors, scales=torch.tensor(s, dtype=torch.float64)), x, None)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
