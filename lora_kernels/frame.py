"""diffusers' attention-processor frame, written once for the project's processors.

`AttentionFrame` does what `diffusers.models.attention_processor.AttnProcessor2_0` (diffusers 0.42) does around the
projections and the attention: the spatial norm, (B, C, H, W) -> (B, HW, C), the attention mask prepared per head,
the group norm; and after: dropout (`to_out[1]`), back to (B, C, H, W), the residual connection and the output
rescale. A processor that changes only the projections or the attention (the fused adapter kernel's here,
the composers' map capture and regions) implements `attend`; `heads` and `attention` are the shared pieces of it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def heads(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """(B, L, heads * d) -> (B, heads, L, d)."""
    return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              record: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Attention over heads after the module's q/k norms: (B, heads, L, d) inputs, an additive mask broadcastable to
    (B, heads, Lq, Lk) or None -> (B, Lq, heads * d) in q's dtype. SDPA (its scale 1 / sqrt(d), as AttnProcessor2_0),
    or, when `record` is a list, explicit probabilities softmax(Q K^T * attn.scale + mask), whose mean over heads
    (B, Lq, Lk) is appended to it with its graph."""
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if record is None:
        mask = mask if mask is None or mask.dtype == torch.bool else mask.to(q)  # a bool mask keeps its meaning
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        scores = q @ k.transpose(-1, -2) * attn.scale  # (B, heads, Lq, Lk)
        if mask is not None:
            scores = scores + mask.to(scores)
        probs = scores.softmax(-1)  # (B, heads, Lq, Lk)
        record.append(probs.mean(1))  # (B, Lq, Lk)
        out = probs @ v
    return out.transpose(1, 2).reshape(q.shape[0], -1, q.shape[1] * q.shape[-1]).to(q.dtype)  # (B, Lq, C)


class AttentionFrame:
    """A diffusers attention processor whose subclass implements `attend`."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = hidden_states.shape
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)  # (B, HW, C)
        batch, tokens, _ = hidden_states.shape
        if attention_mask is not None:
            length = tokens if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])  # (B, h, Lq, Lk)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        out = self.attend(attn, hidden_states, encoder_hidden_states, attention_mask)  # (B, L, C)
        out = attn.to_out[1](out)  # dropout
        if len(shape) == 4:
            out = out.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        # x / 1.0 is x, bit for bit: no kernel launched for it (the UNet's factors are 1.0; a VAE's may not be)
        return out if attn.rescale_output_factor == 1.0 else out / attn.rescale_output_factor

    def attend(self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None,
               attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, L, C) normed hidden states, the encoder states (None in self-attention; not yet through
        `norm_cross`) and the prepared mask (B, heads, Lq, Lk) or None -> (B, L, C) after `to_out[0]`."""
        raise NotImplementedError
