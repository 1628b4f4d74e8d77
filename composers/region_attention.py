"""LoRA-Composer's attention processors: concept injection in cross-attention, concept isolation in self-attention.

Yang et al., "LoRA-Composer: Leveraging Low-Rank Adaptation for Multi-Concept Customization in Training-Free
Diffusion Models", arXiv:2403.11627.
- `RegionCrossAttnProcessor` (§3.3, Eq. 2-3, "region-aware LoRA injection"): the global prompt's attention
  `h0 = softmax(Q K_g^T / sqrt(d)) V_g` outside the boxes; inside box n, `h_n = (W_O + dW_O^n) softmax(Q K_n^T /
  sqrt(d)) V_n` with `K_n = (W_K + dW_K^n) tau_n(P^n)`, `V_n = (W_V + dW_V^n) tau_n(P^n)`, P^n the region prompt
  encoded by concept n's text encoder; overlapping boxes are averaged.
- `IsolatedSelfAttnProcessor` (§3.4, "concept region mask"): -inf added to the self-attention logits of a query in
  box k and a key in another box j != k; background queries and keys in the background stay free.
Both record their maps (averaged over heads, keeping the graph) at the guidance level while `state.capture` is on,
for the latent-guidance losses (§3.4 Eq. 5-9) and the re-initialisation (§3.5).
"""

from __future__ import annotations

from typing import Any

import torch

from composers.region_lora import RegionMasks, lora_delta
from lora_kernels.frame import AttentionFrame, attention, heads


class RegionState:
    """What the processors share: masks, region prompt embeddings, the CFG layout and the captured maps."""

    def __init__(self, names: list[str], regions: RegionMasks, region_embeds: list[torch.Tensor], level: int,
                 levels: dict[str, int]) -> None:
        self.names = names  # boxed adapters, in box order
        self.regions = regions
        self.region_embeds = region_embeds  # per concept: (1, 77, D), its region prompt through its text encoder
        self.level = level  # the level whose maps drive the losses
        self.levels = levels  # processor name -> level
        self.uncond: int = 0  # leading rows of the batch that are the unconditional (negative prompt) half
        self.capture = False
        self.cross: list[list[torch.Tensor]] = [[] for _ in names]  # per concept: (B, L, 77) per layer
        self.self_maps: list[torch.Tensor] = []  # (B, L, L) per layer
        self._isolation: dict[tuple, torch.Tensor] = {}
        self._cells: dict[tuple, tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.stacked: dict[int, Any] = {}  # id(base layer) -> its StackedDeltas, when the spatial deltas are hooked

    def cells(self, tokens: int, like: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The cells outside every box (L0,), and per concept its box's cells (L_n,) with their shares (L_n, 1),
        at a map of `tokens` cells: the same at every step, so found once (on a GPU `nonzero` waits for the
        device)."""
        key = (tokens, like.device, like.dtype)
        if key not in self._cells:
            with torch.inference_mode(False):  # reused by the latent guidance's backward
                self._cells[key] = self._find_cells(tokens, like)
        return self._cells[key]

    def _find_cells(self, tokens: int, like: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        weights = self.regions.at(self.regions.size_of(tokens)).flatten(1)  # (N, L), overlaps averaged
        outside = (weights.sum(0) == 0).nonzero()[:, 0].to(like.device)
        boxes = []
        for w in weights:
            cells = w.nonzero()[:, 0]
            boxes.append((cells.to(like.device), w[cells, None].to(like)))
        return outside, boxes

    def clear(self) -> None:
        self.cross = [[] for _ in self.names]
        self.self_maps = []

    def take(self) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        """The captured maps, handed back by `put` after a recorded step replays (`studio.cuda_graphs.StepOutputs`)."""
        return [list(maps) for maps in self.cross], list(self.self_maps)

    def put(self, taken: tuple[list[list[torch.Tensor]], list[torch.Tensor]]) -> None:
        cross, self_maps = taken
        self.cross, self.self_maps = [list(maps) for maps in cross], list(self_maps)

    def context(self, n: int, negative: torch.Tensor) -> torch.Tensor:
        """Concept n's keys' source: the negative prompt for the uncond rows, its region prompt for the rest."""
        batch = negative.shape[0]
        region = self.region_embeds[n].to(negative).expand(batch - self.uncond, -1, -1)  # (B_c, 77, D)
        return torch.cat([negative[: self.uncond], region])  # (B, 77, D)

    def isolation(self, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """(L, L) additive mask: -inf for a query in box k and a key in box j != k outside box k (§3.4); on `like`'s
        device, in its dtype (built once: an SD1.5 map of 4,096 cells makes it 64 MB)."""
        key = (tokens, like.device, like.dtype)
        if key not in self._isolation:
            with torch.inference_mode(False):
                self._isolation[key] = self._isolation_mask(tokens).to(like)
        return self._isolation[key]

    def _isolation_mask(self, tokens: int) -> torch.Tensor:
        inside = self.regions.at(self.regions.size_of(tokens)).flatten(1) > 0  # (N, L)
        block = torch.zeros(tokens, tokens, dtype=torch.bool)
        for k in range(inside.shape[0]):
            others = inside[[j for j in range(inside.shape[0]) if j != k]].any(0) & ~inside[k]  # (L,) keys
            block |= inside[k][:, None] & others[None, :]
        return torch.zeros(tokens, tokens).masked_fill(block, float("-inf"))  # (L, L)


class _Base(AttentionFrame):
    """diffusers' frame (`lora_kernels.frame`) around LoRA-Composer's attention; the pipeline's attention mask is
    not used (the UNet's prompts carry none)."""

    def __init__(self, state: RegionState, name: str) -> None:
        self.state, self.name = state, name

    def record(self, target: list) -> list | None:
        return target if self.state.capture and self.state.levels[self.name] == self.state.level else None


class RegionCrossAttnProcessor(_Base):
    """Cross-attention with each concept's own prompt and LoRA inside its box (Yang et al. Eq. 2-3)."""

    def __init__(self, state: RegionState, name: str) -> None:
        super().__init__(state, name)
        self._kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._base_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def attend(self, attn: Any, hs: torch.Tensor, context: torch.Tensor | None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        assert context is not None, "a cross-attention processor needs encoder_hidden_states"
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = heads(attn, attn.to_q(hs))  # (B, heads, L, d): the base (and global adapters') query
        if self.record(self.state.cross[0]) is None:
            return self.attend_cells(attn, q, context)
        h0 = attention(attn, q, heads(attn, attn.to_k(context)), heads(attn, attn.to_v(context)), None, None)
        out0 = attn.to_out[0](h0)  # (B, L, C): the global prompt, base weights
        masks = self.state.regions.for_output(out0)  # (N, 1, L, 1), overlaps averaged
        out = out0 * (1 - masks.sum(0))  # outside every box: h0
        for n in range(len(self.state.names)):
            out = out + masks[n] * self.concept(attn, q, context, n, self.record(self.state.cross[n]))
        return out

    def keys_values(self, attn: Any, context: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K_n, V_n (B, heads, 77, d) of concept n; the same at every step of one generation, so kept while the
        pipeline passes the same prompt tensor (outside autograd)."""
        key = (n, self.state.uncond)
        held = self._kv.get(key)
        if held is not None and held[0] is context:
            return held[1], held[2]
        name = self.state.names[n]
        ctx = self.state.context(n, context)  # (B, 77, D): P^n (uncond rows: the negative prompt)
        k, v = attn.to_k(ctx), attn.to_v(ctx)
        dk, dv = lora_delta(attn.to_k, name, ctx), lora_delta(attn.to_v, name, ctx)
        k = heads(attn, k if dk is None else k + dk)  # K_n = (W_K + dW_K^n) tau_n(P^n), Eq. 2
        v = heads(attn, v if dv is None else v + dv)  # V_n = (W_V + dW_V^n) tau_n(P^n)
        if not torch.is_grad_enabled():
            self._kv[key] = (context, k, v)
        return k, v

    def concept(self, attn: Any, q: torch.Tensor, context: torch.Tensor, n: int, record: list | None) -> torch.Tensor:
        """h_n = (W_O + dW_O^n) softmax(Q K_n^T / sqrt(d)) V_n (Eq. 2-3) for the queries `q` (B, heads, L', d)."""
        name = self.state.names[n]
        h = attention(attn, q, *self.keys_values(attn, context, n), None, record)
        do = lora_delta(attn.to_out[0], name, h)
        return attn.to_out[0](h) if do is None else attn.to_out[0](h) + do  # (B, L', C)

    def base_keys_values(self, attn: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global prompt's K, V (B, heads, 77, d), kept like `keys_values`."""
        held = self._base_kv
        if held is not None and held[0] is context:
            return held[1], held[2]
        k, v = heads(attn, attn.to_k(context)), heads(attn, attn.to_v(context))
        if not torch.is_grad_enabled():
            self._base_kv = (context, k, v)
        return k, v

    def attend_cells(self, attn: Any, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The same output, each attention over only the cells that use it (the paper's `Q_n = Q[M_n]`): the global
        prompt over the cells outside every box, concept n over box n's cells."""
        outside, boxes = self.state.cells(q.shape[2], q)  # (L0,), [((L_n,), (L_n, 1))]
        out = q.new_zeros(q.shape[0], q.shape[2], attn.to_out[0].out_features)  # (B, L, C)
        if len(outside):
            h0 = attention(attn, q[:, :, outside], *self.base_keys_values(attn, context), None, None)
            out[:, outside] = attn.to_out[0](h0)
        for n, (cells, share) in enumerate(boxes):
            h = self.concept(attn, q[:, :, cells], context, n, None)  # (B, L_n, C)
            out[:, cells] += share * h
        return out


class IsolatedSelfAttnProcessor(_Base):
    """Self-attention in which a concept's queries cannot see another concept's box (Yang et al. §3.4).

    Where every projection's boxed deltas are stacked on a bare base layer (`region_lora.install_region_deltas`),
    q, k, v and the output go through the fused adapter projection (`lora_kernels.dispatch.projections`, DESIGN.md
    section 7) with S[t, n] = box n's share of token t: the same sum as the hooks, in one base GEMM for q, k and v,
    one shrink and one expand, instead of four layers with a hook each. `fused`: "auto" where the Triton kernel runs
    (a GPU; the torch reference on two CPU cores took 2.11 s a two-adapter studio-tiny image against 1.88 s hooked),
    "always", or "never"."""

    fused = "auto"

    def __init__(self, state: RegionState, name: str) -> None:
        super().__init__(state, name)
        self._packs: dict[tuple, tuple[Any, Any] | None] = {}

    def attend(self, attn: Any, hs: torch.Tensor, context: torch.Tensor | None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = self.state.isolation(hs.shape[1], hs)  # (L, L)
        record = self.record(self.state.self_maps)
        packs = self._fused(attn, hs)
        if packs is None:
            q, k, v = (heads(attn, f(hs)) for f in (attn.to_q, attn.to_k, attn.to_v))
            return attn.to_out[0](attention(attn, q, k, v, mask, record))
        from lora_kernels.dispatch import projections

        regions = self.state.regions
        s = regions.at(regions.size_of(hs.shape[1]), hs).flatten(1).T[None]  # (1, L, N): S, overlaps averaged
        q, k, v = (heads(attn, t) for t in projections(hs, packs[0], s))
        (out,) = projections(attention(attn, q, k, v, mask, record), packs[1], s)
        return out

    def _fused(self, attn: Any, like: torch.Tensor) -> tuple[Any, Any] | None:
        """The packed q|k|v and output projections with the boxes' factors, or None where a projection is not a bare
        base layer with stacked deltas (a free adapter active through PEFT there, or no spatial deltas)."""
        key = (like.dtype, like.device)
        if key not in self._packs:
            layers = [attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]]
            deltas = [self.state.stacked.get(id(m)) for m in layers]
            from lora_kernels.dispatch import choose_backend

            if (self.fused == "never" or any(d is None for d in deltas)
                    or any(not isinstance(m, torch.nn.Linear) for m in layers)
                    or (self.fused == "auto" and choose_backend(like, layers[0].weight) != "triton")):
                self._packs[key] = None
            else:
                from lora_kernels.reference import pack

                n = len(self.state.names)
                with torch.no_grad(), torch.inference_mode(False):  # reused by the latent guidance's backward
                    packed = [pack([m.weight.to(like) for m in group],
                                   [None if m.bias is None else m.bias.to(like) for m in group],
                                   [d.factors(n) for d in ds])
                              for group, ds in ((layers[:3], deltas[:3]), (layers[3:], deltas[3:]))]
                self._packs[key] = (packed[0], packed[1])
        return self._packs[key]
