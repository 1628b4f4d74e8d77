"""B-LoRA: one LoRA on two blocks, trained from one image, saved and loaded as a content and a style entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from trainer_helpers import quick, tiny_pipe

from studio.cli import main
from studio.errors import StudioError
from studio.library import Library, delta_weight, load_adapters, unload_adapters
from studio.models import load_pipeline
from trainers import BLoRA, BLoRAConfig, train
from trainers.data import load_data
from trainers.methods.b_lora import EMBEDDED_BLOCKS, SDXL_BLOCKS, attention_blocks, default_blocks


def _unet_inputs(pipe) -> tuple:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([500]), ctx


def _randomise(method: BLoRA, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.trainable_tensors().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("kind", ["sdxl", "sd1"])
def test_lora_on_both_blocks_attention_only(kind: str) -> None:
    pipe = tiny_pipe(kind)
    content, style = default_blocks(pipe.unet)
    if kind == "sdxl":
        assert (content, style) == SDXL_BLOCKS  # the paper's W4 and W5
    else:  # three up blocks, as the embedded base: its pair
        assert (content, style) == EMBEDDED_BLOCKS
    assert {content, style} <= set(attention_blocks(pipe.unet))
    method = BLoRA(BLoRAConfig(rank=4))
    method.attach(pipe)
    modules = {m.removeprefix("unet.") for m in method.delta_weights()}
    assert modules and all(m.startswith((f"{content}.", f"{style}.")) for m in modules)
    leaves = {m.split("transformer_blocks.")[1].split(".", 1)[1] for m in modules}
    assert leaves == {f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert not any(k.startswith("text_encoder") for k in method.trainable_tensors())  # text encoders frozen


def test_sd1_layout_takes_the_embedded_pair_which_it_has() -> None:
    from diffusers import UNet2DConditionModel

    sd1 = UNet2DConditionModel(  # SD1.x's block layout (4 levels, no attention in up_blocks.0), tiny widths
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=4, sample_size=8,
    )  # fmt: skip
    assert default_blocks(sd1) == EMBEDDED_BLOCKS and set(EMBEDDED_BLOCKS) <= set(attention_blocks(sd1))


def test_entries_split_by_block_and_strength_is_linear(tmp_path: Path) -> None:
    pipe, ref = tiny_pipe(), tiny_pipe()
    x, t, ctx = _unet_inputs(pipe)
    method = BLoRA(BLoRAConfig(rank=4))
    method.attach(pipe)
    with torch.no_grad():
        base = ref.unet(x, t, ctx).sample
        assert torch.equal(pipe.unet(x, t, ctx).sample, base), "a fresh B-LoRA (B = 0) is the identity"
    _randomise(method)
    with torch.no_grad():
        joint = pipe.unet(x, t, ctx).sample
    parts = method.library_entries("leaf")
    assert [p.name for p in parts] == ["leaf-content", "leaf-style"]
    assert [p.meta.kind for p in parts] == ["content", "style"]
    tensors, _ = method.export()
    assert set(parts[0].tensors).isdisjoint(parts[1].tensors)
    assert set(parts[0].tensors) | set(parts[1].tensors) == set(tensors)
    for part in parts:
        block = part.meta.method_config["block"]
        assert all(k.startswith(f"unet.{block}.") for k in part.tensors) and set(part.meta.ranks) == {
            k.rsplit(".lora_", 1)[0] for k in part.tensors
        }
    deltas = method.delta_weights()
    library = Library(tmp_path / "lib")
    for part in parts:
        library.add(part.name, part.tensors, part.meta)
        for module in part.meta.ranks:  # scale 1 (alpha = r): the stored factors give the trained dW
            torch.testing.assert_close(delta_weight(part.meta, part.tensors, module), deltas[module])
    load_adapters(ref, ["leaf-content", "leaf-style"], library=library)
    with torch.no_grad():
        torch.testing.assert_close(ref.unet(x, t, ctx).sample, joint, rtol=1e-4, atol=1e-5)  # together = joint
    unload_adapters(ref)
    # Alone, at weight w: W0 + w dW on the content block's layers (linear; the reference code's alpha acts squared).
    load_adapters(ref, ["leaf-content"], [0.5], library=library)
    module = next(iter(parts[0].meta.ranks)).removeprefix("unet.")
    layer = ref.unet.get_submodule(module)
    h = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = layer.base_layer(h) + 0.5 * h @ deltas[f"unet.{module}"].T
        torch.testing.assert_close(layer(h), want, rtol=1e-4, atol=1e-5)
        alone = ref.unet(x, t, ctx).sample
    assert (alone - base).abs().max() > 1e-4 and (alone - joint).abs().max() > 1e-4
    style_module = next(iter(parts[1].meta.ranks)).removeprefix("unet.")
    assert not hasattr(ref.unet.get_submodule(style_module), "base_layer"), "the style block is untouched"


def test_config_refuses_bad_blocks_and_many_images(tmp_path: Path) -> None:
    with pytest.raises(StudioError, match="not an attention block name"):
        BLoRAConfig(content_block="up_blocks.1")
    with pytest.raises(StudioError, match="the same block"):
        BLoRAConfig(content_block="up_blocks.1.attentions.0", style_block="up_blocks.1.attentions.0")
    with pytest.raises(StudioError, match="has no attention block 'up_blocks.7.attentions.0'"):
        BLoRA(BLoRAConfig(style_block="up_blocks.7.attentions.0")).attach(tiny_pipe())
    folder = tmp_path / "two"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (i * 200, 0, 0)).save(folder / f"{i}.png")
    with pytest.raises(StudioError, match="trains on 1: pass one with --image"):
        load_data(quick(world_emblem=None, images=str(folder)), 32, max_images=1)


def test_one_textured_object_without_prior() -> None:
    both = load_data(quick(world_texture="dots", world_images=20), 32, max_images=1, prior=False)
    assert both.images.shape == (1, 3, 32, 32) and both.class_prompts == []
    assert both.prompts == ["a large sks emblem on the center on a white background in sks style"]
    plain = load_data(quick(world_emblem=None, world_texture="dots"), 32, max_images=1, prior=False)
    assert plain.prompts == ["a large sks on the center on a white background in sks style"]
    assert not torch.equal(plain.images, both.images)
    many = load_data(quick(world_texture="dots", world_images=3, prior_preservation=None), 32)  # 3, prior on
    assert many.images.shape[0] == 3 and len(set(many.prompts)) == 3 and many.class_prompts


def test_train_writes_two_linked_entries_from_one_image_file(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "leaf.png"
    Image.new("RGB", (40, 32), (30, 160, 50)).save(image)
    flags = ["train", "--method", "b_lora", "--image", str(image), "--trigger", "lf", "--name", "leaf",
             "--model", str(tiny_dirs["sd1"]), "--device", "cpu", "--train-steps", "2", "--batch-size", "1",
             "--sample-steps", "1", "--save-every", "0", "--rank", "2"]  # fmt: skip
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert "added 'leaf-content'" in out and "added 'leaf-style'" in out
    library = Library()
    content, style = library.get("leaf-content"), library.get("leaf-style")
    assert content.meta.kind == "content" and style.meta.kind == "style" and content.meta.method == "b_lora"
    assert "[leaf-style](../leaf-style/README.md)" in content.card and "[leaf-content]" in style.card
    record = json.loads((content.folder / "train_config.json").read_text())
    assert record["image"] == str(image) and record["method"] == "b_lora"
    assert set(content.modules).isdisjoint(style.modules)
    pipe = load_pipeline(str(tiny_dirs["sd1"]))
    assert load_adapters(pipe, ["leaf-style"]) == {"leaf-style": 1.0}
    assert load_adapters(pipe, ["leaf-content", "leaf-style"], [1.0, 0.5]) == {"leaf-content": 1.0, "leaf-style": 0.5}
    assert main(flags) == 2 and "'leaf-content' already exists" in capsys.readouterr().err


def test_train_api_returns_both_entries(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    config = quick(world_texture="stripes", model=str(tiny_dirs["sd1"]), name="st", run_dir=str(tmp_path / "run"))
    result = train(BLoRAConfig(rank=2), config, library=Library(tmp_path / "lib"))
    assert [e.name for e in result.entries] == ["st-content", "st-style"] and result.entry.name == "st-content"
    assert "1 Shapes World render(s) of emblem 3 in the stripes texture" in result.entry.card
