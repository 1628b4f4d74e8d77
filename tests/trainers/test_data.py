"""Training data: folders with captions, Shapes World concepts, trigger placement, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from trainer_helpers import quick

from studio.errors import StudioError
from trainers.data import (
    emblem_data,
    folder_data,
    load_data,
    place_trigger,
    prepare_image,
    texture_data,
    world_class_prompts,
)


def _image(path: Path, size: tuple[int, int], colour: str = "red") -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def test_resize_and_center_crop() -> None:
    image = Image.new("RGB", (90, 30), "white")
    image.paste((0, 0, 255), (0, 0, 24, 30))  # blue on the left: cropped away by a center crop
    tensor = prepare_image(image, 16)
    assert tensor.shape == (3, 16, 16) and tensor.min() >= -1 and tensor.max() <= 1
    assert torch.allclose(tensor, torch.ones_like(tensor), atol=0.05), "the center crop keeps the white middle"
    tall = prepare_image(Image.new("RGBA", (20, 50), (0, 255, 0, 128)), 16)
    assert tall.shape == (3, 16, 16)


def test_trigger_placement() -> None:
    assert place_trigger("a photo of {trigger} dog", "sks") == "a photo of sks dog"
    assert place_trigger("a sks dog, on grass", "sks") == "a sks dog, on grass"
    assert place_trigger("a dog on   grass", "sks") == "sks, a dog on grass"
    assert place_trigger("", "sks") == "sks"
    assert place_trigger("masks on a table", "sks") == "sks, masks on a table", "a substring is not the trigger"


def test_folder_with_captions(tmp_path: Path) -> None:
    for i, size in enumerate([(40, 40), (64, 48), (30, 60)]):
        _image(tmp_path / f"{i}.png", size)
    (tmp_path / "0.txt").write_text("a {trigger} dog on the grass\n")
    (tmp_path / "1.txt").write_text("a dog in the snow")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    data = folder_data(tmp_path, "sks", 32, instance_prompt="a photo of {trigger} dog", min_images=3)
    assert data.images.shape == (3, 3, 32, 32)
    assert data.prompts == ["a sks dog on the grass", "sks, a dog in the snow", "a photo of sks dog"]
    assert data.kind == "subject" and "3 images" in data.summary and "2 captioned" in data.summary


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(StudioError, match="no such folder"):
        folder_data(tmp_path / "missing", "sks", 32)
    with pytest.raises(StudioError, match="holds no images"):
        folder_data(tmp_path, "sks", 32)
    for i in range(2):
        _image(tmp_path / f"{i}.jpg", (32, 32))
    with pytest.raises(StudioError, match=r"has 2 image\(s\); this method needs at least 3"):
        folder_data(tmp_path, "sks", 32, min_images=3)
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(StudioError, match=r"notes\.pdf is not an image"):
        folder_data(tmp_path, "sks", 32)
    (tmp_path / "notes.pdf").unlink()
    good = (tmp_path / "0.jpg").read_bytes()
    (tmp_path / "2.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(StudioError, match=r"2\.png is damaged or not an image"):
        folder_data(tmp_path, "sks", 32)
    (tmp_path / "2.png").write_bytes(b"not a png at all")
    with pytest.raises(StudioError, match=r"2\.png is damaged or not an image"):
        folder_data(tmp_path, "sks", 32)


def test_shapes_world_concepts() -> None:
    data = emblem_data(3, "zq", 32, n=4)
    assert data.images.shape == (4, 3, 32, 32) and data.kind == "subject"
    assert all("zq emblem" in p for p in data.prompts) and all("zq" in p for p in data.sample_prompts)
    style = texture_data("stripes", "zq", 32, n=2)
    assert style.kind == "style" and all(p.endswith("in zq style") for p in style.prompts)
    with pytest.raises(StudioError, match="unknown texture"):
        texture_data("plaid", "zq", 32)
    with pytest.raises(StudioError, match="needs at least 3"):
        emblem_data(3, "zq", 32, n=2, min_images=3)


def test_load_data_and_config_checks(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / f"{i}.png", (32, 32))
    with pytest.raises(StudioError, match="--prior-preservation needs --class-prompt"):
        load_data(quick(world_emblem=None, images=str(tmp_path), prior_preservation=True), 32)
    data = load_data(quick(world_emblem=None, images=str(tmp_path), kind="style", sample_prompts=["x"]), 32)
    assert data.kind == "style" and data.sample_prompts == ["x"]


def test_prior_preservation_default_and_class_prompts(tmp_path: Path) -> None:
    """On by default for subjects whose class prompts are known: a --class-prompt, or a world emblem's world scenes."""
    for i in range(3):
        _image(tmp_path / f"{i}.png", (32, 32))
    folder = {"world_emblem": None, "images": str(tmp_path), "prior_preservation": None}
    assert load_data(quick(**folder), 32).class_prompts == []
    data = load_data(quick(**folder, class_prompt="a photo of a dog"), 32)
    assert data.class_prompts == ["a photo of a dog"] and "prior preservation on 50" in data.summary
    assert load_data(quick(**folder, class_prompt="a dog", kind="style"), 32).class_prompts == []

    world = load_data(quick(prior_preservation=None, num_class_images=30), 32)
    assert world.class_prompts == world_class_prompts(30) and world_class_prompts(7) == world.class_prompts[:7]
    assert len(set(world.class_prompts)) > 20 and not any("emblem" in p for p in world.class_prompts)
    counts = {n: sum(p.count(" and ") + 1 == n for p in world.class_prompts) for n in (1, 2, 3)}
    assert all(counts.values()), f"scenes of 1, 2 and 3 objects, like the base's training: {counts}"
    assert load_data(quick(prior_preservation=False), 32).class_prompts == []
    texture = {"world_emblem": None, "world_texture": "stripes", "prior_preservation": None}
    assert load_data(quick(**texture), 32).class_prompts == []  # a style: off unless asked
    assert load_data(quick(**{**texture, "prior_preservation": True}, num_class_images=4), 32).class_prompts == (
        world_class_prompts(4)
    )
    with pytest.raises(StudioError, match="exactly one of --images"):
        quick(image="one.png")  # a file besides the emblem
    with pytest.raises(StudioError, match="exactly one of --images"):
        quick(world_emblem=None)
    with pytest.raises(StudioError, match="not a slug"):
        quick(name="My Adapter")
    with pytest.raises(StudioError, match="multiple of 8"):
        quick(resolution=30)


def test_emblem_renders_with_other_objects() -> None:
    alone = emblem_data(3, "zq", 32, n=8)
    shared = emblem_data(3, "zq", 32, n=8, objects=2)
    assert not any(" and " in p for p in alone.prompts)
    # the emblem comes first, named by its trigger, and some renders hold a second (ordinary) object
    assert all(p.startswith("a ") and p.split(" on ")[0].endswith("zq emblem") for p in shared.prompts)
    assert any(" and " in p for p in shared.prompts) and "other object" in shared.summary
    assert sum(p.count("emblem") for p in shared.prompts) == 8
    assert not torch.equal(alone.images, shared.images)  # other objects are drawn, not only named
    with pytest.raises(StudioError, match="at most 3 objects"):
        quick(world_objects=4)
