"""AutoLoRA's weight encoder and its text side: an adapter's weights and a prompt in one space.

Li et al., "AutoLoRA: Automatic LoRA Retrieval and Fine-Grained Gated Fusion for Text-to-Image Generation"
(arXiv:2508.02107), section 3.1:

- One token per adapted layer l: `t_l = P_type(l)(q_l A_l^T B_l^T)`, a learnable probe q_l (d_in) through the
  layer's delta dW_l = B_l A_l (so the token depends on dW only, not on the rank or factorisation) and one linear
  projection per layer type (d_out -> width).
- A learned position embedding per layer, two pre-norm transformer layers (the CLIP encoder layer), a LayerNorm and a
  mean pool over the layers: e_LoRA (width).
- The text side is a frozen CLIP text tower; here the world CLIP's (`studio.world.clip`), whose width is the space's.

Ours, not the paper's:
- Layers an adapter does not adapt are masked out of attention and of the pool (the paper converts every FLUX LoRA to
  one fixed list of 304 layers); the paper's code runs the layers with CLIP's causal mask, here attention is
  bidirectional (layer order carries no meaning).
- Probe outputs are divided by the adapter's RMS over all its tokens: the library mixes methods whose deltas differ
  in scale (DiffuseKronA's lr is 6x DreamBooth-LoRA's); relative magnitudes between layers are kept.
- The world CLIP's tower reads Shapes World scene captions; its pooled embedding matches only about half of the
  wordings of `studio.world.describe`'s eval set to their own concept's description. So the text side adds a small
  attention-pooling head over the frozen tower's token states (trained with the encoder); the tower itself stays
  frozen, as in the paper. The head reads the final token states
  beside the token embeddings, drops tokens at random in training, and pools only words that its training captions
  contain (the tower never learned the others: their states are noise), so new wordings of a look still match.
- The head reads each text two ways: its token features as they are, and its words alone (`words_only`: the
  contextual states zeroed, so word order and the words around a look weigh nothing). Training reads half of the
  captions the second way; a prompt's embedding is the mean of both readings. Retrieve bench, weights only, one
  encoder layer: the contextual reading alone finds 0.80 top-1 / 0.935 top-3 (it misses trained concepts in the
  eval wordings), the words alone 0.88 / 0.88 (every trained concept in every eval wording, no new concept in its
  top 3). Both, as above, with the default two layers, by cosine: 0.900 / 0.970, 0.875 / 0.920 and 0.865 / 0.910 at
  retriever seeds 0, 1, 2 (the trained concepts first in 176, 175, 173 of their 176 prompts), against 0.800 /
  0.925, 0.825 / 0.945 and 0.825 / 0.930 with the contextual reading alone (156, 163, 157).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


MAX_FACTOR_RANK = 16  # deltas that are not LoRA (LoKr) are read through their best rank-16 factors


@dataclass(frozen=True)
class Layer:
    """One adapted layer the encoder reads: `<component>.<module>`, its delta's output and (flattened) input width."""

    module: str
    d_out: int
    d_in: int

    @property
    def type(self) -> str:
        """The layer type of P_type: component, module kind without block indices, and output width."""
        component, path = self.module.split(".", 1)
        kind = ".".join(re.sub(r"\.\d+(?=\.|$)", "", path).split(".")[-2:])
        return f"{component}.{kind}.{self.d_out}".replace(".", "_")


# An adapter as the encoder reads it: module -> (B (d_out, r) with the scale alpha / r folded in, A (r, d_in)).
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def pad_factors(adapters: list[Factors], layers: list[Layer]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                                       torch.Tensor]:
    """Per layer, the adapters' factors stacked with ranks zero-padded: B (N, d_out, R), A (N, R, d_in); and the
    mask (N, T) of the layers each adapter adapts."""
    stacked, present = [], torch.zeros(len(adapters), len(layers), dtype=torch.bool)
    for j, layer in enumerate(layers):
        rank = max([f[layer.module][1].shape[0] for f in adapters if layer.module in f] or [1])
        b = torch.zeros(len(adapters), layer.d_out, rank)
        a = torch.zeros(len(adapters), rank, layer.d_in)
        for i, f in enumerate(adapters):
            if layer.module in f and tuple(f[layer.module][0].shape[:1]) == (layer.d_out,) and \
                    f[layer.module][1].shape[1] == layer.d_in:
                r = f[layer.module][1].shape[0]
                b[i, :, :r], a[i, :r] = f[layer.module]
                present[i, j] = True
        stacked.append((b, a))
    return stacked, present


class WeightEncoder(nn.Module):
    """Adapter factors -> e_LoRA (N, width) (AutoLoRA section 3.1)."""

    def __init__(self, layers: list[Layer], width: int = 128, depth: int = 2, heads: int = 4, probes: int = 1) -> None:
        super().__init__()
        self.layers = list(layers)
        types = sorted({layer.type for layer in layers})
        dims = {layer.type: layer.d_out for layer in layers}
        self.probes = nn.ParameterList([nn.Parameter(torch.randn(probes, layer.d_in) / layer.d_in**0.5)
                                        for layer in layers])  # q_l: (L, d_in), the paper's L = 1
        self.project = nn.ModuleDict({t: nn.Linear(probes * dims[t], width) for t in types})  # P_type
        self.position = nn.Parameter(torch.randn(len(layers), width) * 0.02)  # (T, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, stacked: list[tuple[torch.Tensor, torch.Tensor]], present: torch.Tensor) -> torch.Tensor:
        outs = []
        for (b, a), q in zip(stacked, self.probes):
            outs.append(torch.einsum("ld,nrd,nor->nlo", q, a, b))  # q A^T B^T: (N, L, d_out)
        rms = torch.stack([(o.pow(2).mean((1, 2))) for o in outs], 1)  # (N, T)
        scale = ((rms * present).sum(1) / present.sum(1).clamp_min(1)).sqrt().clamp_min(1e-12)  # (N,)
        tokens = torch.stack([self.project[layer.type]((o / scale[:, None, None]).flatten(1))
                              for layer, o in zip(self.layers, outs)], 1)  # (N, T, width)
        x = self.blocks(tokens + self.position, src_key_padding_mask=~present)  # (N, T, width)
        x = self.norm(x)
        weights = present.float() / present.float().sum(1, keepdim=True).clamp_min(1)  # (N, T)
        return (x * weights[..., None]).sum(1)  # mean pool over the adapted layers: (N, width)


class TextHead(nn.Module):
    """The text side over the frozen world CLIP tower: `queries` attention pools of its token features, projected
    into the space (the frozen pooled embedding is not added: it follows the scene words, not the concept's)."""

    def __init__(self, hidden: int, width: int, queries: int = 4) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, hidden) / hidden**0.5)  # (Q, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.out = nn.Linear(queries * hidden, width)

    def forward(self, pooled: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # pooled (B, width), unused; states (B, n, hidden), mask (B, n) True on the tokens to pool
        logits = self.key(states) @ self.query.T  # (B, n, Q)
        attn = logits.masked_fill(~mask[..., None], float("-inf")).softmax(1)  # (B, n, Q)
        return self.out(torch.einsum("bnq,bnh->bqh", attn, states).flatten(1))  # (B, width)


@torch.no_grad()
def tower_features(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen world CLIP tower on `texts`: pooled projection (B, D), token features (B, n, 2h): the final states
    beside the token embeddings (the words themselves, whatever their order), the mask of real tokens (B, n) and the
    token ids (B, n)."""
    from studio.world.clip import load_clip, tokenize

    model = load_clip()
    ids = tokenize(texts)  # (B, 77)
    eot = ids.argmax(-1)  # first end-of-text: the highest id
    n = int(eot.max()) + 1
    ids = ids[:, :n]
    words = model.token_embedding(ids)  # (B, n, h)
    x = model.ln_final(model.transformer(words + model.positional_embedding[:n], attn_mask=model.attn_mask[:n, :n]))
    pooled = x[torch.arange(len(texts)), eot] @ model.text_projection  # (B, D)
    mask = torch.arange(n)[None] <= eot[:, None]  # (B, n)
    return pooled, torch.cat([x, words], -1), mask, ids


def words_only(states: torch.Tensor) -> torch.Tensor:
    """`tower_features`' token features (B, n, 2h) with the contextual half (the final states) zeroed: the words
    themselves."""
    context = torch.zeros_like(states[..., : states.shape[-1] // 2])
    return torch.cat([context, states[..., states.shape[-1] // 2:]], -1)  # (B, n, 2h)


def info_nce(text: torch.Tensor, weights: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of AutoLoRA section 3.1 (S = T E^T over L2-normalised sides), with several positives per row
    when a concept has several adapters (`positive` (N, N) bool; the target spreads over them)."""
    s = F.normalize(text, dim=-1) @ F.normalize(weights, dim=-1).T / temperature  # (N, N)
    target = positive.float() / positive.float().sum(1, keepdim=True)
    rows = -(target * s.log_softmax(1)).sum(1).mean()
    cols = -(target.T * s.T.log_softmax(1)).sum(1).mean()
    return (rows + cols) / 2
