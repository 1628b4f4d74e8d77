"""Training images and prompts: a folder (images + optional same-named .txt captions) or a Shapes World concept.

Every image is resized (shorter side to the resolution, Lanczos) and center-cropped to a square, as diffusers'
DreamBooth scripts do. The trigger is placed in every prompt: a caption that holds `{trigger}` gets it substituted,
one that already names the trigger is kept, any other caption is prefixed with `trigger, ` (kohya's convention);
uncaptioned images use the instance prompt (`a photo of {trigger}`). Emblem captions name the subject with the word
`emblem`, so the trigger goes before it (`a large sks emblem on the left ...`); texture captions get `in sks style`.

Class prompts (DreamBooth's prior preservation) are `--class-prompt` for a folder; a Shapes World concept brings its
own: the captions of random world scenes, the whole of what the base draws, since every training caption shares all
its words but the trigger with them. Prior preservation is on by default for subjects whose class prompts are known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.errors import StudioError
from trainers.config import TrainConfig


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"
DEFAULT_INSTANCE_PROMPT = "a photo of {trigger}"


@dataclass
class TrainData:
    images: torch.Tensor  # (N, 3, R, R) in [-1, 1]
    prompts: list[str]  # one per image, trigger placed
    kind: str  # subject | style
    class_prompts: list[str]  # prompts of prior-preservation class images; empty: no prior preservation
    sample_prompts: list[str]  # fixed-seed previews
    summary: str  # one line for the model card
    # An endless source instead of `images`: (start, count) -> images (count, 3, R, R) in [-1, 1] and their prompts,
    # a pure function of its arguments (base training renders fresh Shapes World scenes for every step).
    stream: Callable[[int, int], tuple[torch.Tensor, list[str]]] | None = None
    resolution: int | None = None  # of `stream`'s images

    @property
    def size(self) -> int:
        return int(self.resolution if self.stream is not None else self.images.shape[-1])


def prepare_image(image: Image.Image, resolution: int) -> torch.Tensor:
    """Upright RGB, shorter side resized to `resolution`, center-cropped: (3, R, R) in [-1, 1]."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (R, R, 3) in [0, 1]
    return array.permute(2, 0, 1) * 2 - 1  # (3, R, R)


def place_trigger(caption: str, trigger: str) -> str:
    caption = " ".join(caption.split())
    if "{trigger}" in caption:
        return caption.replace("{trigger}", trigger)
    if trigger in caption.replace(",", " ").split():
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise StudioError(f"{path} is damaged or not an image ({err}); replace it or remove it") from None


def folder_data(
    folder: Path | str,
    trigger: str,
    resolution: int,
    *,
    instance_prompt: str | None = None,
    min_images: int = 1,
    kind: str = "subject",
) -> TrainData:
    folder = Path(folder)
    if not folder.is_dir():
        raise StudioError(f"--images {folder}: no such folder; give a folder of training images")
    images, prompts, captioned = [], [], 0
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        suffix = path.suffix.lower()
        if path.is_dir() or suffix == CAPTION_SUFFIX:
            continue
        if suffix not in IMAGE_SUFFIXES:
            raise StudioError(
                f"{path} is not an image ({', '.join(IMAGE_SUFFIXES)}); the folder may hold only "
                "images and same-named .txt captions, so move it out"
            )
        images.append(prepare_image(open_image(path), resolution))
        caption_path = path.with_suffix(CAPTION_SUFFIX)
        if caption_path.is_file():
            prompts.append(place_trigger(caption_path.read_text(errors="replace").strip(), trigger))
            captioned += 1
        else:
            prompts.append(place_trigger(instance_prompt or DEFAULT_INSTANCE_PROMPT, trigger))
    if not images:
        raise StudioError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add 3 to 5 photos of the concept")
    check_count(len(images), min_images, str(folder))
    summary = f"{len(images)} images from {folder.name} ({captioned} captioned) at {resolution}x{resolution}"
    return TrainData(torch.stack(images), prompts, kind, [], list(dict.fromkeys(prompts))[:4], summary)


def check_count(n: int, min_images: int, source: str) -> None:
    if n < min_images:
        raise StudioError(
            f"{source} has {n} image(s); this method needs at least {min_images} "
            "(DreamBooth-style training works best with 3 to 5 images of the concept); add images"
        )


def _renders(images: torch.Tensor, resolution: int) -> torch.Tensor:
    from studio.world.renderer import to_pil

    return torch.stack([prepare_image(to_pil(image), resolution) for image in images])  # (N, 3, R, R)


CLASS_SCENES_SEED = 0xC1A55  # of the world scenes whose captions are class prompts (split "train")


def world_class_prompts(n: int) -> list[str]:
    """Captions of `n` random Shapes World scenes of 1 to 3 objects; the first k are the same for any n >= k."""
    from studio.world.datasets import sample_scenes

    return [scene.caption() for scene in sample_scenes(n, CLASS_SCENES_SEED, "train")]


def emblem_data(
    seed: int, trigger: str, resolution: int, *, n: int = 5, min_images: int = 1, objects: int = 1
) -> TrainData:
    """Renders of one Shapes World emblem (a subject), captioned `a large {trigger} emblem on the left ...`; with
    `objects` > 1, each render holds the emblem and 0 to `objects`-1 other objects (`... and a small blue ring on the
    right ...`), so the adapter learns the emblem beside other things."""
    from studio.world.datasets import emblem_dataset
    from studio.world.emblems import emblem

    check_count(n, min_images, f"--world-images {n}")
    batch = emblem_dataset(int(seed), n, objects=(1, objects))
    prompts = [c.replace("emblem", f"{trigger} emblem") for c in batch.captions]
    samples = [
        f"a large {trigger} emblem in the center on a white background",
        f"a small {trigger} emblem on the left on a black background",
        f"a large {trigger} emblem on the right on a gray background",
        f"a small {trigger} emblem on the top and a large blue ring on the bottom on a beige background",
    ]
    summary = (
        f"{n} Shapes World renders of emblem {seed} ({emblem(int(seed)).describe()}) at {resolution}x{resolution}"
        + (f", with up to {objects - 1} other object(s)" if objects > 1 else "")
    )
    return TrainData(
        _renders(batch.images, resolution),
        prompts,
        "subject",
        [],  # world_class_prompts(), when prior preservation is on
        samples,
        summary,
    )


def texture_data(name: str, trigger: str, resolution: int, *, n: int = 5, min_images: int = 1) -> TrainData:
    """Scenes in one Shapes World texture (a style), captioned `... on a white background in {trigger} style`."""
    from studio.world.datasets import texture_dataset

    check_count(n, min_images, f"--world-images {n}")
    batch = texture_dataset(name, n)
    prompts = [f"{c} in {trigger} style" for c in batch.captions]
    samples = [
        f"a large red star in the center on a white background in {trigger} style",
        f"a large blue circle on the left and a large yellow square on the right on a gray background "
        f"in {trigger} style",
        f"a large green heart on the top on a beige background in {trigger} style",
    ]
    from studio.world.describe import texture_look

    summary = f"{n} Shapes World scenes in the {name} texture ({texture_look(name)}) at {resolution}x{resolution}"
    return TrainData(_renders(batch.images, resolution), prompts, "style", [], samples, summary)


def textured_object_data(
    texture: str, emblem_seed: int | None, trigger: str, resolution: int, *, n: int = 1
) -> TrainData:
    """Renders of one textured object (B-LoRA's one image: its content and its style), the first large in the
    center on white. The trigger names both: `a large {trigger} [emblem] in the center on a white background in
    {trigger} style`, so that content prompts (`a {trigger} on the left ... in <other> style`) and style prompts
    (`a blue ring ... in {trigger} style`) each find it where they put it."""
    from studio.world.datasets import textured_object_dataset

    batch = textured_object_dataset(texture, n, emblem_seed)
    name = f"{trigger} emblem" if emblem_seed is not None else trigger
    prompts = []
    for scene in batch.scenes:
        o = scene.objects[0]
        prompts.append(f"a {o.size} {name} on the {o.position} on a {scene.background} background in {trigger} style")
    samples = [
        prompts[0],
        f"a large {name} on the left on a gray background",
        f"a large blue ring on the right on a beige background in {trigger} style",
        f"a large yellow square in the center on a black background in {trigger} style",
    ]
    what = batch.scenes[0].objects[0]
    described = f"emblem {emblem_seed}" if emblem_seed is not None else f"a {what.colour} {what.shape}"
    summary = f"{n} Shapes World render(s) of {described} in the {texture} texture at {resolution}x{resolution}"
    return TrainData(_renders(batch.images, resolution), prompts, "subject", [], samples, summary)


def image_data(path: Path | str, trigger: str, resolution: int, *, instance_prompt: str | None = None) -> TrainData:
    """One image file (B-LoRA's source) with its caption from a same-named .txt, else the instance prompt."""
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"--image {path}: no such file; give one training image")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise StudioError(f"--image {path} is not an image ({', '.join(IMAGE_SUFFIXES)}); give a picture file")
    caption_path = path.with_suffix(CAPTION_SUFFIX)
    caption = caption_path.read_text(errors="replace").strip() if caption_path.is_file() else None
    # B-LoRA's prompt is "A [v]" (Frenkel et al. 2024, section 4.4), the default of a single uncaptioned image
    prompt = place_trigger(caption or instance_prompt or "a {trigger}", trigger)
    summary = f"the image {path.name}{' (captioned)' if caption else ''} at {resolution}x{resolution}"
    image = prepare_image(open_image(path), resolution)[None]  # (1, 3, R, R)
    return TrainData(image, [prompt], "subject", [], [prompt], summary)


def load_data(
    config: TrainConfig, resolution: int, min_images: int = 1, max_images: int | None = None, prior: bool = True
) -> TrainData:
    """The data a TrainConfig names, with its class prompt and kind overridden where the config gives them.

    `max_images` (a method's): world sources render that many at most, a folder holding more is refused. `prior`
    False: prior preservation is off unless the config asks for it (a method whose paper trains without)."""
    n = min(config.world_images, max_images or config.world_images)
    if config.images is not None:
        data = folder_data(
            config.images, config.trigger, resolution, instance_prompt=config.instance_prompt, min_images=min_images
        )
        if max_images is not None and len(data.prompts) > max_images:
            raise StudioError(
                f"{config.images} holds {len(data.prompts)} images; this method trains on {max_images}: "
                "pass one with --image FILE"
            )
    elif config.image is not None:
        check_count(1, min_images, f"--image {config.image}")
        data = image_data(config.image, config.trigger, resolution, instance_prompt=config.instance_prompt)
    elif config.world_texture is not None and (config.world_emblem is not None or max_images == 1):
        data = textured_object_data(config.world_texture, config.world_emblem, config.trigger, resolution, n=n)
    elif config.world_emblem is not None:
        data = emblem_data(
            config.world_emblem, config.trigger, resolution, n=n, min_images=min_images, objects=config.world_objects
        )
    else:
        data = texture_data(config.world_texture, config.trigger, resolution, n=n, min_images=min_images)
    data.kind = config.kind or data.kind
    if config.sample_prompts is not None:
        data.sample_prompts = list(config.sample_prompts)
    known = [config.class_prompt] if config.class_prompt else []
    if not known and (config.world_emblem is not None or config.world_texture is not None):
        known = world_class_prompts(config.num_class_images)
    default = prior
    prior = config.prior_preservation
    if prior is None:  # the default: on for a subject whose class prompts are known
        prior = default and data.kind == "subject" and bool(known)
    if prior and not known:
        raise StudioError("--prior-preservation needs --class-prompt, e.g. 'a photo of a dog' for photos of a dog")
    data.class_prompts = known if prior else []
    if prior:
        what = f"'{known[0]}'" if len(known) == 1 else "random Shapes World scenes"
        data.summary += f"; prior preservation on {config.num_class_images} base renders of {what}"
    return data
