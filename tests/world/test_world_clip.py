"""World CLIP: the open_clip text tower converts exactly to a transformers CLIPTextModel (SD-style EOT padding)."""

from __future__ import annotations

import pytest
import torch

from studio.world.clip import build_clip, encode_text, to_clip_text_model, tokenize


def test_tokenize_pads_with_eot() -> None:
    ids = tokenize(["a large red star on the left on a white background"])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406
    assert (ids[0, 13:] == 49407).all() and (ids[0, :12] != 49407).all()


def test_text_tower_conversion_is_exact() -> None:
    torch.manual_seed(0)
    model = build_clip().eval()
    with torch.no_grad():  # random weights are too tame: spread them so a wrong mapping would show
        for p in model.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    text_model = to_clip_text_model(model)
    ids = tokenize(["a red star", "a small blue ring on the right and a large black cross on the top left"])
    with torch.no_grad():
        out = text_model(input_ids=ids)
        x = model.token_embedding(ids) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))  # (B, 77, width)
        pooled = x[torch.arange(2), (ids == 49407).int().argmax(dim=1)]
        assert torch.allclose(out.last_hidden_state, x, atol=1e-5)
        assert torch.allclose(out.pooler_output, pooled, atol=1e-5)
        assert torch.allclose(out.pooler_output @ model.text_projection, model.encode_text(ids), atol=1e-5)
        assert torch.allclose(encode_text(model, ids[:, :40]), model.encode_text(ids), atol=1e-5)
    assert text_model.config.hidden_act == model.transformer.resblocks[0].mlp.gelu.__class__.__name__.lower().replace(
        "quickgelu", "quick_gelu"
    )


def test_shipped_clip_scores() -> None:
    from studio.world.clip import CLIP_DIR, clip_i, clip_t

    if not (CLIP_DIR / "model.safetensors").is_file():
        pytest.skip("world CLIP not trained yet")
    from studio.world import render
    from studio.world.grammar import parse_caption

    a = parse_caption("a large red star on the left on a white background")
    b = parse_caption("a small blue ring on the bottom right on a black background")
    imgs = render([a, b], seed=0)
    t = clip_t(imgs, [a.caption(), b.caption()])
    swapped = clip_t(imgs, [b.caption(), a.caption()])
    assert (t > swapped).all()
    assert clip_i(imgs, imgs).diagonal().min() > 0.99
