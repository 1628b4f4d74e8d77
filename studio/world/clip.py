"""World CLIP: a small open_clip model trained on Shapes World renders and captions, shipped in `assets/world-clip/`.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (arXiv:2103.00020):
symmetric InfoNCE over a batch (section 2.3, Fig. 3 pseudocode) with a learned temperature. Texts use the real CLIP
BPE tokenizer with Stable Diffusion's padding (every pad is `<|endoftext|>` 49407), QuickGELU, and argmax (first
EOT) pooling, so the text tower converts exactly to a transformers `CLIPTextModel` (`to_clip_text_model`): the
embedded base's text encoder starts from it. Scores: CLIP-T = cosine(image, text) and CLIP-I = cosine(image, image)
(Ruiz et al., DreamBooth, arXiv:2208.12242, section 4.1), computed with this model instead of OpenAI's.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from studio.errors import StudioError
from studio.paths import ASSETS


if TYPE_CHECKING:
    import open_clip
    from transformers import CLIPTextModel


CLIP_DIR = ASSETS / "world-clip"
EMBED_DIM = 128
VISION_CFG = {"layers": 3, "width": 96, "head_width": 32, "patch_size": 8, "image_size": 64, "mlp_ratio": 4.0}
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4, "mlp_ratio": 4.0}
TRAIN_CONTEXT = 48  # captions fit in 48 tokens; the causal mask makes the first 48 positions exact
EOT_ID = 49407


def build_clip() -> open_clip.CLIP:
    import open_clip

    return open_clip.CLIP(embed_dim=EMBED_DIM, vision_cfg=dict(VISION_CFG), text_cfg=dict(TEXT_CFG), quick_gelu=True)


@functools.lru_cache(maxsize=1)
def _tokenizer():  # -> transformers.CLIPTokenizer
    from studio.models.tokenizer import clip_tokenizer

    return clip_tokenizer()


@functools.lru_cache(maxsize=65536)
def _ids(text: str) -> tuple[int, ...]:
    return tuple(_tokenizer()(text, truncation=True, max_length=77)["input_ids"])


def tokenize(texts: list[str], length: int = 77) -> torch.Tensor:
    """(B, length) ids: `<|startoftext|> ... <|endoftext|>` padded with `<|endoftext|>` (SD-style)."""
    out = torch.full((len(texts), length), EOT_ID, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = _ids(t)[:length]
        if ids[-1] != EOT_ID:
            ids = ids[:-1] + (EOT_ID,)
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def encode_text(model, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Projected text features (B, EMBED_DIM); `ids` may be shorter than 77 (the causal mask is sliced)."""
    n = ids.shape[1]
    x = model.token_embedding(ids) + model.positional_embedding[:n]  # (B, n, width)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    pooled = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]  # first EOT: the highest id in the sequence
    return pooled @ model.text_projection


def encode_image(model, images: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Projected image features (B, EMBED_DIM) from images (B, 3, 64, 64) in [0, 1]."""
    return model.encode_image(images * 2 - 1)


@functools.lru_cache(maxsize=2)
def load_clip(path: str = str(CLIP_DIR)) -> open_clip.CLIP:  # fp32, eval
    from safetensors.torch import load_file

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise StudioError(f"no world CLIP at {path}; train it with `studio world train-clip`")
    model = build_clip()
    model.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    return model.eval()


@torch.no_grad()
def clip_t(images: torch.Tensor, prompts: list[str], model=None) -> torch.Tensor:  # noqa: ANN001
    """CLIP-T: cosine similarity of each image (B, 3, 64, 64) in [0, 1] with its prompt; shape (B,)."""
    model = model or load_clip()
    a = F.normalize(encode_image(model, images.float()), dim=-1)
    b = F.normalize(encode_text(model, tokenize(prompts)), dim=-1)
    return (a * b).sum(-1)


@torch.no_grad()
def clip_i(images_a: torch.Tensor, images_b: torch.Tensor, model=None) -> torch.Tensor:  # noqa: ANN001
    """CLIP-I: cosine similarity of image embeddings, pairwise (Ba, Bb)."""
    model = model or load_clip()
    a = F.normalize(encode_image(model, images_a.float()), dim=-1)
    b = F.normalize(encode_image(model, images_b.float()), dim=-1)
    return a @ b.T


@torch.no_grad()
def retrieval_top1(images: torch.Tensor, captions: list[str], model=None) -> float:  # noqa: ANN001
    """Fraction of captions whose own image (same index) ranks first among all images."""
    model = model or load_clip()
    a = F.normalize(encode_image(model, images.float()), dim=-1)
    b = F.normalize(encode_text(model, tokenize(captions)), dim=-1)
    return (b @ a.T).argmax(dim=1).eq(torch.arange(len(captions))).float().mean().item()


def negative_accuracy(images: torch.Tensor, scenes: list, model=None, seed: int = 0) -> float:  # noqa: ANN001
    """Fraction of images that score their own caption above a hard negative (one position or binding changed)."""
    from studio.world.negatives import hard_negative

    model = model or load_clip()
    rng = np.random.default_rng([0x4E6, seed])
    negatives = [hard_negative(s, rng).caption() for s in scenes]
    with torch.no_grad():
        a = F.normalize(encode_image(model, images), dim=-1)  # (N, D)
        own = F.normalize(encode_text(model, tokenize([s.caption() for s in scenes])), dim=-1)
        neg = F.normalize(encode_text(model, tokenize(negatives)), dim=-1)
    return ((a * own).sum(-1) > (a * neg).sum(-1)).float().mean().item()


def to_clip_text_model(model: open_clip.CLIP | None = None, dtype: torch.dtype = torch.float32
                       ) -> CLIPTextModel:
    """The world CLIP's text tower as a transformers `CLIPTextModel` (same last_hidden_state and pooler_output)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = model or load_clip()
    width, layers = TEXT_CFG["width"], TEXT_CFG["layers"]
    config = CLIPTextConfig(
        vocab_size=TEXT_CFG["vocab_size"],
        hidden_size=width,
        intermediate_size=int(width * TEXT_CFG["mlp_ratio"]),
        num_hidden_layers=layers,
        num_attention_heads=TEXT_CFG["heads"],
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=EMBED_DIM,
        bos_token_id=49406,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
    )
    sd = model.state_dict()
    out = {
        "embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "final_layer_norm.weight": sd["ln_final.weight"],
        "final_layer_norm.bias": sd["ln_final.bias"],
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = sd[src + "attn.in_proj_weight"].chunk(3)  # (3 * width, width) -> 3 x (width, width)
        qb, kb, vb = sd[src + "attn.in_proj_bias"].chunk(3)
        for name, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            out[f"{dst}self_attn.{name}_proj.weight"], out[f"{dst}self_attn.{name}_proj.bias"] = w, b
        pairs = {
            "attn.out_proj": "self_attn.out_proj",
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for a, b in pairs.items():
            out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = sd[f"{src}{a}.weight"], sd[f"{src}{a}.bias"]
    text = CLIPTextModel(config)
    missing, unexpected = text.load_state_dict({k: v.float() for k, v in out.items()}, strict=False)
    missing = [m for m in missing if "position_ids" not in m]
    if missing or unexpected:
        raise StudioError(f"CLIP text conversion mismatch: missing {missing}, unexpected {unexpected}")
    return text.to(dtype).eval()


def train_clip(
    out: str | Path = CLIP_DIR,
    steps: int = 900,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    threads: int = 2,
    hard_negatives: bool = True,
) -> dict:
    """Train the world CLIP from scratch (seeded) and save it atomically in fp16; returns the training summary.

    With `hard_negatives` every image also scores a caption of its own scene with one position or colour binding
    changed (NegCLIP, arXiv:2210.01936 section 4; `studio.world.negatives`).
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from studio.world.datasets import world_batch
    from studio.world.negatives import hard_negative

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_clip().train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    warmup = 100
    start = time.time()
    bar = tqdm(range(steps), desc="train-clip")
    for step in bar:
        t = (step - warmup) / max(1, steps - warmup)
        for g in opt.param_groups:  # linear warm-up, cosine decay (CLIP section 2.5)
            g["lr"] = lr * (step + 1) / warmup if step < warmup else lr * 0.5 * (1 + math.cos(math.pi * t))
        batch = world_batch(batch_size, step, split="train")
        img = F.normalize(encode_image(model, batch.images), dim=-1)  # (B, D)
        captions = batch.captions
        if hard_negatives:
            rng = np.random.default_rng([0x4E6, seed, step])
            captions = captions + [hard_negative(s, rng).caption() for s in batch.scenes]
        txt = F.normalize(encode_text(model, tokenize(captions, TRAIN_CONTEXT)), dim=-1)  # (B or 2B, D)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B) or (B, 2B): negatives as columns
        labels = torch.arange(batch_size)
        # CLIP Fig. 3; image-to-text over the batch's captions and the negatives, text-to-image over the captions
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :batch_size].T, labels)) / 2
        if not torch.isfinite(loss):
            raise StudioError(f"CLIP loss became {loss.item()} at step {step}; lower --lr and train again")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    val = world_batch(100, 0, split="eval")
    top1 = retrieval_top1(val.images, val.captions, model)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors")
    )
    config = {
        "embed_dim": EMBED_DIM,
        "vision_cfg": VISION_CFG,
        "text_cfg": TEXT_CFG,
        "quick_gelu": True,
        "pad_id": EOT_ID,
        "image_range": "[0, 1] images are mapped to [-1, 1]",
    }
    (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    summary = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "hard_negatives": hard_negatives,
        "val_top1_of_100": top1,
        "val_position_and_binding_of_100": negative_accuracy(val.images, val.scenes, model),
        "seconds": time.time() - start,
    }
    (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    for f in tmp.iterdir():
        f.chmod(0o644)
    if (out / "README.md").is_file():
        shutil.copy(out / "README.md", tmp / "README.md")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    load_clip.cache_clear()
    return summary
