"""Retrieval of library adapters by prompt (AutoLoRA, Li et al., arXiv:2508.02107, section 3.1).

    from studio.library.retrieval import train_retriever, retrieve
    train_retriever(library)                    # contrastive, on the library's own adapters; kept with the library
    retrieve("a yellow star inside a purple ring with a red dot", k=3)   # [Retrieved(name, score, ...), ...]

Two signals, both in the world CLIP text space (`studio.library.encoder`):
- weights: the AutoLoRA encoder reads each adapter's deltas (never its card) into e_LoRA; the paper ranks by the
  cosine with the prompt's text embedding (its inference: cosine top-k against the cached pool embeddings). Ours:
  the cosine corrected for hubness, CSLS (Conneau et al., ICLR 2018, "Word translation without parallel data", eq. 6):
  2 cos(t, e) - r(e), r(e) the mean cosine of e with its 10 nearest training captions (kept with the retriever), so
  the adapters the retriever learned, close to every caption of their own look, no longer crowd out the ones it
  never saw. Retrieve bench (weights only, retriever seeds 0 / 1 / 2): top-1 0.885 / 0.840 / 0.860, top-3 0.970 /
  0.950 / 0.965, the new concepts' top-3 0.75 / 0.58 / 0.71; by the cosine alone 0.900 / 0.875 / 0.865, 0.970 /
  0.920 / 0.910, and 0.75 / 0.33 / 0.25.
- metadata (optional, `weights_only=False`): the TF-IDF cosine of the prompt with the adapter's card summary,
  trigger words, tags and description (`studio.library.lexical`). A lexical signal, not the encoder's text side:
  cards are not captions (their wording is the trainer's), and the text head is trained on captions only.
With both, each is standardised over the library (z-scores) and the two are summed.

The retriever and the index live in `<library>/.retrieval/` (hidden, so the library ignores them):
`retriever.safetensors` + `retriever.json`, and `index.json` (each adapter's embeddings with the folder stamp they
were computed from). The index is refreshed on every retrieval: added or changed adapters are embedded, removed
ones dropped.

Training captions (the paper draws one of three VLM captions per step): a Shapes World adapter's look in words
(`studio.world.describe`, train phrasings); any other adapter's description, tags and card summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from studio import atomic
from studio.errors import StudioError
from studio.library.adapter import TRAIN_CONFIG_NAME
from studio.library.encoder import (
    MAX_FACTOR_RANK,
    Factors,
    Layer,
    TextHead,
    WeightEncoder,
    info_nce,
    pad_factors,
    tower_features,
    words_only,
)
from studio.library.lexical import tfidf_scores
from studio.library.meta import modules_of
from studio.library.store import Entry, Library, _stamp


log = logging.getLogger(__name__)
FOLDER = ".retrieval"
MODEL_NAME, CONFIG_NAME, INDEX_NAME = "retriever.safetensors", "retriever.json", "index.json"
INDEX_VERSION = 1
CAPTION_SEEDS = 8  # Shapes World adapters: each train phrasing with this many draws of its scene words
CSLS_K = 10  # neighbourhood of the hubness correction (Conneau et al. 2018's K)


@dataclass
class RetrieverConfig:
    """AutoLoRA's retriever; defaults: the paper's architecture at the world CLIP's width, a small library's steps."""

    depth: int = field(default=2, metadata={"help": "transformer layers (paper: 2)"})
    heads: int = 4
    probes: int = field(default=1, metadata={"help": "probe vectors per layer (paper: L = 1)"})
    # retrieve bench (28 adapters, 22 trained on), weights-only top-1 with the text head that read the words only in
    # their context: 300 steps 0.68-0.73, 1000 0.78-0.80, 2000 0.78
    steps: int = field(default=1000, metadata={"help": "optimizer steps (paper: 20 epochs x 100 steps)"})
    batch_size: int = field(default=32, metadata={"help": "adapters per step (paper: 32)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (paper: 1e-4 over 2,000 steps)"})
    temperature: float = field(default=0.07, metadata={"help": "softmax temperature of the InfoNCE logits"})
    token_dropout: float = field(default=0.2, metadata={"help": "fraction of layer and word tokens dropped per step"})
    context_dropout: float = field(default=0.5, metadata={
        "help": "fraction of captions read from their words alone in training (`encoder.words_only`)"})
    seed: int = 0


@dataclass
class Retrieved:
    name: str
    score: float  # what the ranking uses
    weights: float | None  # CSLS: 2 cosine(prompt, e_LoRA) - r(e_LoRA); None without a retriever for this adapter
    metadata: float | None  # cosine(prompt, metadata text); None when weights only
    # Whether the retriever was trained on this adapter (by name); None without a retriever. Looks it never saw are
    # read poorly from the weights (retrieve bench, cross-validated: top-3 0.41, against 1.00 for learned ones).
    learned: bool | None = None


# --- reading adapters --------------------------------------------------------------------------------------------
def adapter_factors(entry: Entry) -> Factors:
    """Each module's delta as factors: B (d_out, r) scaled by alpha / r, A (r, d_in); LoKr through a rank-16 SVD."""
    sd, meta = entry.state_dict(), entry.meta
    out: Factors = {}
    for module in modules_of(sd):
        if meta.peft_type == "LORA":
            a = sd[f"{module}.lora_A.weight"].float().flatten(1)  # (r, d_in * kh * kw)
            b = sd[f"{module}.lora_B.weight"].float().flatten(1) * (meta.alphas[module] / meta.ranks[module])
        else:
            from studio.library.tools import delta_weight  # imports peft: only for LoKr

            u, s, vh = torch.linalg.svd(delta_weight(meta, sd, module), full_matrices=False)  # dW (d_out, d_in)
            r = min(MAX_FACTOR_RANK, s.numel())
            b, a = u[:, :r] * s[:r], vh[:r]  # (d_out, r), (r, d_in)
        out[module] = (b, a)
    return out


def _train_config(entry: Entry) -> dict[str, Any]:
    try:
        return json.loads((entry.folder / TRAIN_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return {}


def adapter_captions(entry: Entry) -> list[str]:
    """What the retriever learns to match an adapter with: its look in words, else its own text."""
    from studio.world.describe import phrasings

    tc = _train_config(entry)
    source = {k: tc[k] for k in ("world_emblem", "world_texture") if tc.get(k) is not None}
    if source:
        return [p for seed in range(CAPTION_SEEDS) for p in phrasings(**source, split="train", seed=seed)]
    texts = [entry.meta.description, " ".join(entry.meta.tags), _card_summary(entry)]
    return [t for t in texts if t.strip()] or [entry.name.replace("-", " ")]


def _card_summary(entry: Entry) -> str:
    """The model card's first paragraph after its title (the trainers write what the adapter learned there)."""
    lines = [line.strip() for line in entry.card.split("---")[-1].splitlines()]
    body = [line for line in lines if line and not line.startswith(("#", "-", "!", "`"))]
    return body[0] if body else ""


def metadata_text(entry: Entry) -> str:
    """The text signal: trigger words, tags, description and the card summary."""
    m = entry.meta
    return " ".join(t for t in [*m.trigger_words, *m.tags, m.description, _card_summary(entry)] if t).strip()


# --- the retriever -----------------------------------------------------------------------------------------------
class Retriever:
    """A trained weight encoder and text head, for one library's base."""

    def __init__(self, encoder: WeightEncoder, head: TextHead, info: dict[str, Any],
                 references: torch.Tensor | None = None) -> None:
        self.encoder, self.head, self.info = encoder.eval(), head.eval(), info
        self.references = references  # (C, D): the training captions' embeddings; None for retrievers from before

    @property
    def digest(self) -> str:
        return str(self.info.get("digest", ""))

    @torch.no_grad()
    def embed_adapters(self, adapters: list[Factors]) -> torch.Tensor:
        """e_LoRA (N, D), L2-normalised; rows of adapters sharing no layer with the encoder are zero."""
        stacked, present = pad_factors(adapters, self.encoder.layers)
        e = F.normalize(self.encoder(stacked, present), dim=-1)
        return e * present.any(1, keepdim=True)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        pooled, states, mask, ids = tower_features(texts)
        known = torch.tensor(self.info.get("known_tokens", []), dtype=torch.long)
        if known.numel():
            kept = mask & torch.isin(ids, known)  # words the head was trained on (start and end tokens always are)
            mask = torch.where(kept.any(1, keepdim=True), kept, mask)
        both = F.normalize(self.head(pooled, states, mask), dim=-1)  # (B, D): the words in their context
        alone = F.normalize(self.head(pooled, words_only(states), mask), dim=-1)  # the words whatever their order
        return F.normalize(both + alone, dim=-1)

    def hubness(self, adapters: torch.Tensor) -> torch.Tensor:
        """r(e) of CSLS for adapter embeddings (N, D): the mean cosine with the CSLS_K nearest training captions
        (N,); zeros without references."""
        if self.references is None or not len(self.references):
            return torch.zeros(len(adapters))
        k = min(CSLS_K, len(self.references))
        return (self.references @ adapters.T).topk(k, 0).values.mean(0)  # (C, N) -> (N,)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        state = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        state |= {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if self.references is not None:
            state["references"] = self.references
        atomic.atomic_write(folder / MODEL_NAME, lambda tmp: save_file(
            {k: v.contiguous() for k, v in state.items()}, str(tmp)))
        atomic.write_json(folder / CONFIG_NAME, self.info)

    @classmethod
    def load(cls, folder: Path) -> Retriever | None:
        from safetensors.torch import load_file

        if not (folder / MODEL_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
            return None
        try:
            info = json.loads((folder / CONFIG_NAME).read_text())
            config = RetrieverConfig(**info["config"])
            layers = [Layer(*row) for row in info["layers"]]
            encoder = WeightEncoder(layers, int(info["width"]), config.depth, config.heads, config.probes)
            head = TextHead(int(info["hidden"]), int(info["width"]))
            state = load_file(str(folder / MODEL_NAME))
            encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
            head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
            references = state.get("references")
            if references is not None and (references.ndim != 2 or references.shape[1] != int(info["width"])):
                raise ValueError(f"references of shape {tuple(references.shape)} for width {info['width']}")
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            raise StudioError(f"the retriever in {folder} is damaged ({err}); train it again with "
                              "`studio retrieve --train`") from None
        return cls(encoder, head, info, references)


def train_retriever(
    library: Library | None = None,
    config: RetrieverConfig | None = None,
    *,
    exclude: tuple[str, ...] | list[str] = (),
    captions: Callable[[Entry], list[str]] = adapter_captions,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the retriever contrastively on the library's adapters (minus `exclude`) and keep it with the library."""
    from tqdm import tqdm

    library = library or Library()
    config = config or RetrieverConfig()
    entries = [e for e in library.list() if e.name not in set(exclude)]
    if len(entries) < 2:
        raise StudioError(f"the retriever learns from at least 2 adapters; {library.root} has {len(entries)} "
                          "(add adapters, e.g. with `studio train`)")
    began = time.perf_counter()
    torch.manual_seed(config.seed)
    factors = [adapter_factors(e) for e in entries]
    shapes: dict[str, tuple[int, int]] = {}
    for f in factors:
        for module, (b, a) in f.items():
            shapes.setdefault(module, (b.shape[0], a.shape[1]))
    layers = [Layer(m, *shapes[m]) for m in sorted(shapes)]
    stacked, present = pad_factors(factors, layers)
    texts = [captions(e) for e in entries]
    flat = [t for ts in texts for t in ts]
    offsets = torch.tensor([0, *map(len, texts)]).cumsum(0)  # adapter i's captions: flat[offsets[i]:offsets[i+1]]
    pooled, states, mask, ids = tower_features(flat)  # frozen: computed once
    groups = {tuple(ts): g for g, ts in enumerate(dict.fromkeys(tuple(ts) for ts in texts))}
    concept = torch.tensor([groups[tuple(ts)] for ts in texts])  # adapters with the same captions are one concept
    width = pooled.shape[-1]  # tokens live in the text space (paper: 768, CLIP-L's)
    torch.manual_seed(config.seed)  # here: loading the world CLIP the first time draws from the global generator
    encoder = WeightEncoder(layers, width, config.depth, config.heads, config.probes)
    head = TextHead(states.shape[-1], width)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    bar = tqdm(range(config.steps), desc="train retriever", disable=not progress)
    for _ in bar:
        batch = torch.randperm(len(entries), generator=gen)[: config.batch_size]  # (N,)
        pick = offsets[batch] + (torch.rand(len(batch), generator=gen) * (offsets[batch + 1] - offsets[batch])).long()
        keep = present[batch] & (torch.rand(len(batch), len(layers), generator=gen) >= config.token_dropout)
        keep[~keep.any(1), 0] = True  # never an empty adapter
        e = encoder([(b[batch], a[batch]) for b, a in stacked], keep & present[batch])
        words = mask[pick] & (torch.rand(mask[pick].shape, generator=gen) >= config.token_dropout)
        words[~words.any(1), 0] = True
        alone = torch.rand(len(batch), generator=gen) < config.context_dropout  # (N,)
        feats = torch.where(alone[:, None, None], words_only(states[pick]), states[pick])  # (N, n, 2h)
        t = head(pooled[pick], feats, words)
        loss = info_nce(t, e, concept[batch][:, None] == concept[batch][None], config.temperature)
        if not torch.isfinite(loss):
            raise StudioError(f"the retriever's loss became {loss.item()}; train again with a lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    digest = hashlib.sha256(json.dumps([asdict(config), [e.name for e in entries], losses[-1]]).encode()).hexdigest()
    info = {"config": asdict(config), "layers": [[x.module, x.d_out, x.d_in] for x in layers],
            "hidden": int(states.shape[-1]), "width": int(width), "trained_on": [e.name for e in entries],
            "excluded": sorted(exclude),
            "known_tokens": sorted(set(ids[mask].tolist())),
            "final_loss": losses[-1], "seconds": round(time.perf_counter() - began, 1), "digest": digest[:16]}
    folder = library.root / FOLDER
    retriever = Retriever(encoder, head, info)
    retriever.references = retriever.embed_texts(list(dict.fromkeys(flat)))  # (C, D), for CSLS
    retriever.save(folder)
    (folder / INDEX_NAME).unlink(missing_ok=True)  # embeddings of the old retriever
    return info


# --- the index and retrieval -------------------------------------------------------------------------------------
def load_retriever(library: Library | None = None) -> Retriever | None:
    return Retriever.load((library or Library()).root / FOLDER)


def refresh_index(library: Library | None = None, retriever: Retriever | None = None) -> dict[str, dict[str, Any]]:
    """The index of every library adapter's embeddings, recomputed where an adapter was added or changed, without
    the removed ones; written back when anything changed."""
    library = library or Library()
    retriever = retriever if retriever is not None else load_retriever(library)
    digest = retriever.digest if retriever else ""
    path = library.root / FOLDER / INDEX_NAME
    try:
        old = json.loads(path.read_text())
        rows = old["adapters"] if (old.get("retriever"), old.get("version")) == (digest, INDEX_VERSION) else {}
    except (OSError, ValueError, KeyError, TypeError):
        rows = {}
    entries = library.list()
    fresh = {e.name: rows[e.name] for e in entries if rows.get(e.name, {}).get("stamp") == _stamp(e.folder)}
    todo = [e for e in entries if e.name not in fresh]
    if todo:
        weights = retriever.embed_adapters([adapter_factors(e) for e in todo]) if retriever else None
        for i, e in enumerate(todo):
            w = weights[i] if weights is not None and bool(weights[i].any()) else None
            fresh[e.name] = {"stamp": _stamp(e.folder), "metadata": metadata_text(e) or e.name.replace("-", " "),
                             "weights": w.tolist() if w is not None else None}
    if todo or set(fresh) != set(rows):
        rows_out = dict(sorted(fresh.items()))
        atomic.write_json(path, {"version": INDEX_VERSION, "retriever": digest, "adapters": rows_out})
    return fresh


def _z(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-6) if x.numel() > 1 else x


def retrieve(prompt: str, k: int = 3, *, weights_only: bool = False, metadata: bool = True,
             library: Library | None = None) -> list[Retrieved]:
    """The `k` library adapters that best match `prompt`, best first, with their scores.

    `weights_only` ranks by the weight encoder alone; `metadata=False` is the same. Without a trained retriever,
    metadata alone ranks (weights-only retrieval then asks for `studio retrieve --train`)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise StudioError("give a prompt that describes what you want, e.g. 'a yellow star inside a purple ring'")
    if k < 1:
        raise StudioError(f"--k must be at least 1, got {k}")
    library = library or Library()
    retriever = load_retriever(library)
    use_meta = metadata and not weights_only
    if retriever is None and not use_meta:
        raise StudioError(f"no retriever for the library {library.root}; train one with `studio retrieve --train`")
    index = refresh_index(library, retriever)
    if not index:
        raise StudioError(f"the library {library.root} has no adapters to retrieve: train one (`studio train`), "
                         "import one (`studio library import PATH`), or point STUDIO_LIBRARY at your library")
    names = sorted(index)
    have = [n for n in names if index[n]["weights"] is not None] if retriever else []
    w = {}
    if have and retriever is not None:
        query = retriever.embed_texts([prompt])[0]  # (D,)
        e = torch.tensor([index[n]["weights"] for n in have])  # (N, D)
        csls = 2 * (e @ query) - retriever.hubness(e)  # (N,); r(prompt) is the same for every adapter
        w = dict(zip(have, csls.tolist()))
    m = dict(zip(names, tfidf_scores(prompt, [index[n]["metadata"] for n in names]))) if use_meta else {}
    if not use_meta:
        if not have:
            raise StudioError("no adapter of this library matches the retriever's layers (another base?); "
                              "train it again with `studio retrieve --train`")
        scores = w
    elif not have:
        scores = m
    else:
        zw = dict(zip(have, _z(torch.tensor([w[n] for n in have])).tolist()))
        zm = dict(zip(names, _z(torch.tensor([m[n] for n in names])).tolist()))
        scores = {n: zm[n] + zw.get(n, 0.0) for n in names}
    ranked = sorted(scores, key=lambda n: -scores[n])[:k]
    trained = set(retriever.info.get("trained_on", [])) if retriever is not None else None
    return [Retrieved(n, round(scores[n], 4), None if n not in w else round(w[n], 4),
                      None if n not in m else round(m[n], 4), None if trained is None else n in trained)
            for n in ranked]
