"""CLoRA on the tiny pipelines with random (non-identity) adapters: prompts and token groups, the NT-Xent loss against
its definition, the fusion masks, an exact equivalence, and exact removal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from composer_helpers import add_random_adapter
from tiny_models import BUILDERS

import composers
from composers import AdapterSet, CloraConfig
from composers.clora import MapAverage, attention_masks, contrastive_loss, map_level, plan
from studio.generate import GenerateConfig, generate


PAIR = "a large qa emblem on the left and a large qb emblem on the right on a white background"
ONE = "a large qa emblem on the left and a small blue circle on the right on a white background"


def _pipe():
    pipe = BUILDERS["sd1"]()
    add_random_adapter(pipe, "qa", 1, kind="subject", scale=0.5)
    add_random_adapter(pipe, "qb", 2, kind="subject", scale=0.5)
    add_random_adapter(pipe, "st", 3, kind="style", scale=0.5)
    return pipe


def test_prompts_groups_and_mask_tokens_follow_the_words() -> None:
    tok = _pipe().tokenizer
    p = plan(PAIR, ["qa", "qb", "st"], {"qa": "subject", "qb": "subject", "st": "style"}, tok)
    assert p.subjects == ["qa", "qb"]  # the style adapter runs in every prompt instead
    assert p.prompts == [PAIR.replace("qa ", "").replace("qb ", ""), PAIR.replace("qb ", ""), PAIR.replace("qa ", "")]

    def words(text: str, tokens: list[int]) -> str:
        return tok.decode([tok(text).input_ids[t] for t in tokens])

    assert [words(t, g) for t, g in zip(p.prompts, p.groups[0])] == ["emblem", "qa emblem", "emblem"]
    assert [words(t, g) for t, g in zip(p.prompts, p.groups[1])] == ["emblem", "emblem", "qb emblem"]
    assert words(p.prompts[2], p.groups[1][2]) == "qb emblem" and p.groups[1][2][0] > p.groups[0][2][0]
    # a subject's mask: its clause's position word; without one, its token group
    assert p.mask_tokens[0] == []
    assert [words(t, m) for t, m in zip(p.prompts[1:], p.mask_tokens[1:])] == ["left", "right"]
    bare = "a qa emblem and a qb emblem on a white background"
    q = plan(bare, ["qa", "qb"], {"qa": "subject", "qb": "subject"}, tok)
    assert q.mask_tokens == [[], q.groups[0][1], q.groups[1][2]]
    assert words(q.prompts[1], q.mask_tokens[1]) == "qa emblem"
    one = plan(ONE, ["qa"], {"qa": "subject"}, tok)
    assert [words(t, g) for t, g in zip(one.prompts, one.groups[1])] == ["blue circle", "blue circle"]
    assert words(one.prompts[1], one.mask_tokens[1]) == "left"
    paper = plan(PAIR, ["qa", "qb"], {"qa": "subject", "qb": "subject"}, tok, places=False)
    assert paper.mask_tokens == [[], paper.groups[0][1], paper.groups[1][2]]  # the paper's: the concept's tokens


def test_contrastive_loss_is_nt_xent() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 10, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    tau = 0.5
    cos = torch.nn.functional.cosine_similarity(v[:, None], v[None, :], dim=-1) / tau
    terms = []
    for a in range(6):
        for p in range(6):
            if a != p and labels[a] == labels[p]:
                neg = sum(math.exp(cos[a, n]) for n in range(6) if labels[n] != labels[a])
                terms.append(-math.log(math.exp(cos[a, p]) / (math.exp(cos[a, p]) + neg)))
    assert contrastive_loss(v, labels, tau).item() == np.float32(np.mean(terms)).item() or math.isclose(
        contrastive_loss(v, labels, tau).item(), float(np.mean(terms)), rel_tol=1e-5)
    apart = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]])
    mixed = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.1, 1]])
    two = torch.tensor([0, 0, 1, 1])
    assert contrastive_loss(apart, two, tau) < contrastive_loss(mixed, two, tau)


def test_masks_threshold_each_token_and_give_the_rest_to_the_base_prompt() -> None:
    a = torch.zeros(1, 2, 2, 4)
    a[0, 0, 0, 1], a[0, 0, 1, 1] = 1.0, 0.2  # prompt 1's token 1: above 0.3 x max at (0, 0) only
    b = torch.zeros(1, 2, 2, 4)
    b[0, 1, 1, 2] = 0.5
    masks = attention_masks([torch.zeros(1, 2, 2, 4), a, b], [[], [1], [2]], 0.3)[:, 0, 0]  # (P, h, w)
    assert masks.tolist() == [[[0, 1], [1, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 1]]]


def test_masks_read_the_maps_averaged_over_the_steps_so_far_and_a_new_generation_starts_anew() -> None:
    average = MapAverage()
    a, b, c = (torch.full((1, 2, 2, 3), v) for v in (1.0, 3.0, 8.0))
    assert torch.equal(average([a, b], 0)[1], b)
    second = average([b, c], 1)
    assert torch.equal(second[0], (a + b) / 2) and torch.equal(second[1], (b + c) / 2)
    assert torch.equal(average([c, a], 2)[0], (a + b + c) / 3)
    assert torch.equal(average([c, a], 0)[0], c)  # the next generation's first step
    assert torch.equal(average([c[:, :1], a[:, :1]], 1)[0], c[:, :1])  # another size: starts anew too


def test_maps_come_from_the_papers_level_latent_over_4(monkeypatch: pytest.MonkeyPatch) -> None:
    assert map_level(BUILDERS["sd1"]().unet) == 2 and map_level(BUILDERS["sdxl"]().unet) == 2  # levels 0-2, 1-2
    monkeypatch.setattr("composers.clora.attention_levels", lambda unet: {"a.attn2": 0, "b.attn2": 1})
    assert map_level(torch.nn.Module()) == 1  # no latent / 4 level: the coarsest there is


def test_one_adapter_with_full_masks_and_no_update_is_that_adapter_alone_and_removal_is_exact() -> None:
    pipe = _pipe()
    config = GenerateConfig(prompt=ONE, steps=3, size="32x32", num_images=2)
    before = generate(config, pipe=pipe, output_type="np").images
    alone = composers.compose(config, AdapterSet.parse("qa"), "merge", pipe=pipe, output_type="np").images
    full = CloraConfig(step_size=0, mask_threshold=-1.0)  # every cell in prompt 1's mask, latents untouched
    same = composers.compose(config, AdapterSet.parse("qa"), "clora", full, pipe=pipe, output_type="np").images
    # equal up to float rounding: the captured layers compute softmax(QK^T) explicitly instead of SDPA
    assert np.abs(same - alone).max() < 5e-3 < np.abs(before - alone).max()
    guided = composers.compose(config, AdapterSet.parse("qa"), "clora", CloraConfig(refine_iterations=1),
                               pipe=pipe, output_type="np")
    assert np.isfinite(guided.images).all() and np.abs(guided.images - same).max() > 1e-3  # updates and masks
    assert guided.params[0]["composer_config"]["prompt"] == ONE
    assert np.array_equal(generate(config, pipe=pipe, output_type="np").images, before)


def test_two_adapters_on_sdxl_compose_apart_from_merge_and_removal_is_exact() -> None:
    pipe = BUILDERS["sdxl"]()
    add_random_adapter(pipe, "qa", 1, kind="subject", scale=0.5)
    add_random_adapter(pipe, "qb", 2, kind="subject", scale=0.5)
    config = GenerateConfig(prompt=PAIR, steps=3, size="32x32")
    before = generate(config, pipe=pipe, output_type="np").images
    merged = composers.compose(config, AdapterSet.parse("qa,qb"), "merge", pipe=pipe, output_type="np").images
    with composers.apply(pipe, AdapterSet.parse("qa,qb").resolve(), "clora", CloraConfig().for_prompt(PAIR)) as h:
        composed = generate(config, pipe=pipe, output_type="np").images
        assert h.state.prompts[1] == PAIR.replace("qb ", "")  # the second text encoder reads the same prompts
    assert np.isfinite(composed).all() and np.abs(composed - merged).max() > 1e-3
    assert np.array_equal(generate(config, pipe=pipe, output_type="np").images, before)
