"""`lora_kernels.frame`: a processor built on `AttentionFrame` equals diffusers' `AttnProcessor2_0` on every variant of
`Attention` the frame handles (spatial and group norms, 4-D input, masks, cross-attention norm, q/k norms, residual
and output rescale), and the recorded path's probabilities are the SDPA path's."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lora_kernels.frame import AttentionFrame, attention, heads


attention_processor = pytest.importorskip("diffusers.models.attention_processor")
D, D_CTX, HEADS, DIM_HEAD = 32, 24, 2, 16


class Plain(AttentionFrame):
    """q, k, v and out through the module's own layers; recorded (explicit probabilities) when `record` is a list."""

    def __init__(self, record: list[torch.Tensor] | None = None) -> None:
        self.record = record

    def attend(self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None,
               attention_mask: torch.Tensor | None) -> torch.Tensor:
        if context is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = heads(attn, attn.to_q(hidden_states))  # (B, heads, Lq, d)
        k, v = heads(attn, attn.to_k(context)), heads(attn, attn.to_v(context))  # (B, heads, Lk, d)
        return attn.to_out[0](attention(attn, q, k, v, attention_mask, self.record))


def _randomized(attn: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random, norms' affine parameters included (they start at the identity)."""
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return attn.double().eval()


CASES = {  # name: (Attention's options, input shape, cross-attention, masked)
    # a VAE mid-block: 4-D input, GroupNorm, residual, rescaled output
    "vae": ({"norm_num_groups": 8, "residual_connection": True, "rescale_output_factor": 2.0, "bias": True},
            (2, D, 4, 4), False, False),
    # a decoder with SpatialNorm on the latent (temb = z_q)
    "spatial": ({"spatial_norm_dim": 4, "residual_connection": True}, (2, D, 4, 4), False, False),
    # cross-attention with a LayerNorm on the encoder states, q/k LayerNorms and a padding mask
    "cross": ({"cross_attention_dim": D_CTX, "cross_attention_norm": "layer_norm", "qk_norm": "layer_norm"},
              (2, 10, D), True, True),
    # self-attention with a mask over the keys
    "self": ({}, (2, 10, D), False, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_frame_processor_equals_attn_processor_2_0(case: str) -> None:
    options, shape, cross, masked = CASES[case]
    torch.manual_seed(0)
    attn = _randomized(attention_processor.Attention(query_dim=D, heads=HEADS, dim_head=DIM_HEAD, **options))
    x = torch.randn(*shape, dtype=torch.float64)
    context = torch.randn(2, 7, D_CTX, dtype=torch.float64) if cross else None
    keys = 7 if cross else x.flatten(2).shape[-1] if x.ndim == 4 else 10
    mask = None
    if masked:  # additive, as the UNet passes it: the last keys of sample 1 masked out
        mask = torch.zeros(2, 1, keys, dtype=torch.float64)
        mask[1, :, -3:] = -10000.0
    temb = torch.randn(2, 4, 2, 2, dtype=torch.float64) if case == "spatial" else None
    args = {"encoder_hidden_states": context, "attention_mask": mask, "temb": temb}

    want = attention_processor.AttnProcessor2_0()(attn, x, **args)
    torch.testing.assert_close(Plain()(attn, x, **args), want, rtol=1e-10, atol=1e-10)
    record: list[torch.Tensor] = []
    torch.testing.assert_close(Plain(record)(attn, x, **args), want, rtol=1e-10, atol=1e-10)
    (probs,) = record  # (B, Lq, Lk), averaged over heads
    assert probs.shape == (2, x.flatten(2).shape[-1] if x.ndim == 4 else 10, keys)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))
    if mask is not None:
        assert probs[1, :, -3:].max() < 1e-6 and probs[0, :, -3:].min() > 0  # masked keys get no weight


def test_a_bool_mask_keeps_its_meaning() -> None:
    """SDPA reads True as 'attend'; a bool mask must reach it as bool, not as an additive 0/1."""
    torch.manual_seed(0)
    attn = _randomized(attention_processor.Attention(query_dim=D, heads=HEADS, dim_head=DIM_HEAD))
    q, k, v = (torch.randn(1, HEADS, 5, DIM_HEAD, dtype=torch.float64) for _ in range(3))
    keep = torch.tensor([True, True, False, False, True])
    got = attention(attn, q, k, v, keep[None, None, None])  # (1, 1, 1, Lk)
    want = attention(attn, q, k[:, :, keep], v[:, :, keep])
    torch.testing.assert_close(got, want)
