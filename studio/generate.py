"""`studio.generate`: text to image on any supported base, with the parameters recorded in each PNG.

Image i of a run uses its own CPU generator seeded `seed + i`, so an image is reproducible on its own (A1111's
convention) and identical across processes and machines for the same model, device and dtype.

Before anything is allocated the memory the request needs is estimated (`studio.memory`): a request that cannot fit
is refused with the estimate and the free memory, one that fits only with diffusers' VAE tiling / attention slicing
gets them (recorded in each PNG, since tiles change the pixels slightly), and an out-of-memory error while sampling
is retried once with them, then reported with the settings to lower.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from studio.configs import check_numbers
from studio.cuda_graphs import graphed_unet
from studio.errors import Cancelled, OutOfMemory, StudioError
from studio.memory import MemoryPlan, is_out_of_memory, memory_savers, parameter_of, plan_memory, release_memory
from studio.models import DEFAULT_MODEL, load_pipeline
from studio.prompt_tags import split_lora_tags
from studio.prompts import encode_prompt
from studio.schedulers import SCHEDULERS, make_scheduler, scheduler_name
from studio.sizes import human


DEFAULT_GUIDANCE = 7.5  # diffusers' default, for models that recommend none


@dataclass
class GenerateConfig:
    prompt: str = field(metadata={"help": "what to draw"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "studio-tiny, a diffusers folder, a .safetensors "
                                                                 "checkpoint or a hub id"})
    negative: str = field(default="", metadata={"help": "negative prompt"})
    seed: int = field(default=0, metadata={"help": "seed of the first image; image i uses seed + i"})
    steps: int = field(default=20, metadata={"help": "sampling steps"})
    guidance: float | None = field(default=None, metadata={"help": "classifier-free guidance scale (1 disables it); "
                                                                   "default the model's recommended one, else 7.5"})
    guidance_rescale: float | None = field(default=None, metadata={
        "help": "rescale the guided prediction's std toward the conditional one's (0-1; Lin et al. arXiv:2305.08891 "
                "eq. 15-16); default the model's recommended one, else 0", "metavar": "PHI"})
    size: str | None = field(default=None, metadata={"help": "WxH, default the model's native size",
                                                      "metavar": "WxH"})
    scheduler: str | None = field(default=None, metadata={"help": "sampler, default the model's own",
                                                           "choices": list(SCHEDULERS)})
    num_images: int = field(default=1, metadata={"help": "images to make; more than one also writes a grid"})
    clip_skip: int | None = field(default=None, metadata={"help": "use the text encoder's k-th layer from the end"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto"})
    cuda_graphs: bool = field(default=True, metadata={
        "help": "on a GPU, replay each denoising step as one recorded CUDA graph where nothing alters the UNet "
                "between steps (no-: plain launches)"})
    attention_slicing: bool | None = field(default=None, metadata={
        "help": "compute attention one head at a time (diffusers' attention slicing; helps where attention is not "
                "already memory-efficient); default: on when the memory estimate needs it"})
    vae_tiling: bool | None = field(default=None, metadata={
        "help": "decode in overlapping tiles, one image at a time (diffusers' VAE tiling and slicing): large sizes "
                "in little memory; default: on when the memory estimate needs it"})

    def __post_init__(self) -> None:
        check_numbers(self)  # NaN / infinity refused, naming the flag
        if self.steps < 1:
            raise StudioError(f"--steps must be at least 1, got {self.steps}")
        if self.num_images < 1:
            raise StudioError(f"--num-images must be at least 1, got {self.num_images}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise StudioError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.size is not None:
            parse_size(self.size)
        if self.guidance_rescale is not None and not 0.0 <= self.guidance_rescale <= 1.0:
            raise StudioError(f"--guidance-rescale must be between 0 and 1, got {self.guidance_rescale}")


def parse_size(size: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError as err:
        raise StudioError(f"--size must look like 512x512, got {size!r}") from err
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise StudioError(f"--size {size}: width and height must be multiples of 8 (e.g. 64x64)")
    return width, height


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StudioError(f"--device {device}: no CUDA device is available; use --device cpu")
    return device


@functools.lru_cache(maxsize=2)
def cached_pipeline(model: str, device: str, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """One loaded pipeline per (model, device, dtype), shared by the CLI, UI and batch jobs of a process."""
    return load_pipeline(model, device=device, dtype=dtype)


@dataclass
class GenerateResult:
    images: list[Image.Image]
    params: list[dict[str, Any]]  # one per image: everything needed to make it again


def model_setting(pipe: DiffusionPipeline, key: str, default: float) -> float:
    """A sampling setting a model recommends (`studio.json` in its folder, written by studio training)."""
    folder = Path(str(getattr(pipe, "name_or_path", "") or ""))
    try:
        value = json.loads((folder / "studio.json").read_text()).get(key)
    except (OSError, ValueError):
        value = None
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise StudioError(f"{folder / 'studio.json'}: {key} must be a number, got {value!r}; fix or delete it") \
            from None


def model_guidance(pipe: DiffusionPipeline) -> float:
    """The guidance scale a model recommends, else 7.5."""
    return model_setting(pipe, "guidance", DEFAULT_GUIDANCE)


@contextlib.contextmanager
def prompt_adapters(pipe: DiffusionPipeline, tags: list[tuple[str, float]]) -> Iterator[dict[str, float]]:
    """Load the library adapters a prompt's tags name for the duration of the block; yields the active set.

    Adapters the caller loaded before (`studio.load_adapters`) stay, tagged ones are weighted as tagged, and the
    ones loaded here are released afterwards: kept warm for the next call but out of the model (`studio.library.warm`),
    so a cached pipeline is what it was before.
    """
    from studio.library.load import load_adapters, loaded_adapters, release_adapters

    before = loaded_adapters(pipe)
    if not tags:
        yield before
        return
    names, weights = zip(*tags)
    try:
        active = load_adapters(pipe, list(names), list(weights))
        yield active
    finally:
        added = [n for n in loaded_adapters(pipe) if n not in before]
        if added:
            release_adapters(pipe, added)
        if before:
            load_adapters(pipe, list(before), list(before.values()))  # the caller's weights again


def native_size(pipe: DiffusionPipeline) -> tuple[int, int]:
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


def memory_plan(config: GenerateConfig, pipe: DiffusionPipeline, free_memory: int | None = None) -> MemoryPlan:
    """The memory `config` needs on `pipe`'s device and the savers it runs with, or a StudioError when it cannot fit
    (`studio.memory.plan_memory`); the CLI asks before its progress bar, `generate` before any work."""
    width, height = parse_size(config.size) if config.size else native_size(pipe)
    guidance = config.guidance if config.guidance is not None else model_guidance(pipe)
    where = str(parameter_of(pipe.unet).device)  # a caller's pipeline (a training run's) may live elsewhere
    return plan_memory(pipe, width, height, config.num_images, guidance > 1.0, where,
                       attention_slicing=config.attention_slicing, vae_tiling=config.vae_tiling, free=free_memory)


def generate(
    config: GenerateConfig,
    *,
    pipe: DiffusionPipeline | None = None,
    progress: Callable[[int, int], None] | None = None,
    output_type: str = "pil",
    prompts: list[str] | None = None,
    seeds: list[int] | None = None,
    cancel: threading.Event | None = None,
    free_memory: int | None = None,
    adapter_sets: list[dict[str, float]] | None = None,
) -> GenerateResult:
    """Make `config.num_images` images. `progress(step, total)` is called after every denoising step.

    `output_type` is diffusers': "pil" (the default), or "np" / "pt" for float images in [0, 1]. `prompts` gives
    each image its own prompt in one batch (`config.num_images` of them; `<lora:...>` tags only in `config.prompt`),
    `seeds` its own seed (default `config.seed + i` for image i). Setting `cancel` stops the run after the current
    step with `studio.errors.Cancelled`. `free_memory` (bytes) replaces the device's free memory in the check.
    `adapter_sets` gives each image its own library adapters {name: weight} (with `prompts`; none in
    `config.prompt`), all in one batch (`studio.mixed`; adapters loaded before stay active in every image; attention
    unsliced, so a batch that needs slicing is refused with `OutOfMemory`).
    """
    if prompts is not None and len(prompts) != config.num_images:
        raise StudioError(f"{len(prompts)} prompts for {config.num_images} images")
    if seeds is not None and len(seeds) != config.num_images:
        raise StudioError(f"{len(seeds)} seeds for {config.num_images} images")
    seeds = seeds if seeds is not None else [config.seed + i for i in range(config.num_images)]
    device = resolve_device(config.device)
    pipe = pipe or cached_pipeline(config.model, device)
    own_scheduler = pipe.__dict__.setdefault("_studio_own_scheduler", pipe.scheduler)  # the model's own sampler
    pipe.scheduler = make_scheduler(config.scheduler, own_scheduler.config) if config.scheduler else own_scheduler
    width, height = parse_size(config.size) if config.size else native_size(pipe)
    guidance = config.guidance if config.guidance is not None else model_guidance(pipe)
    guided = guidance > 1.0
    rescale = config.guidance_rescale if config.guidance_rescale is not None else model_setting(
        pipe, "guidance_rescale", 0.0)
    if adapter_sets is not None:  # their processor computes attention itself: never sliced (`studio.mixed`)
        config = dataclasses.replace(config, attention_slicing=False)
    plan = memory_plan(config, pipe, free_memory)  # refuses what cannot fit, before any work
    prompt, tags = split_lora_tags(config.prompt)  # A1111 `<lora:name:w>` tags select library adapters
    if adapter_sets is not None and (prompts is None or len(adapter_sets) != config.num_images or tags):
        raise StudioError("adapter_sets needs one adapter set per image, with `prompts`, and no <lora:...> tags in "
                          "the config's prompt")
    from studio.library.fuse import merged_for_call
    from studio.library.load import loaded_adapters
    from studio.mixed import mixed_adapters

    union = sorted({n for chosen in adapter_sets or [] for n in chosen})
    before = loaded_adapters(pipe)
    with contextlib.ExitStack() as stack:
        active = stack.enter_context(prompt_adapters(pipe, tags if adapter_sets is None else
                                                     [(n, 1.0) for n in union if n not in before]))
        texts = prompts if prompts is not None else prompt
        if adapter_sets is None:
            if tags:  # the tagged (and the caller's) adapters in the weights for the call, if nothing else is at work
                stack.enter_context(merged_for_call(pipe))
            embeds = encode_prompt(pipe, texts, config.negative or None, guidance=guided, clip_skip=config.clip_skip)
        else:
            adapter_sets = [{**before, **chosen} for chosen in adapter_sets]
            embeds = stack.enter_context(mixed_adapters(pipe, texts, adapter_sets, config.negative or None, guided,
                                                        config.clip_skip))

        def on_step_end(_pipe: DiffusionPipeline, step: int, _t: Any, kwargs: dict) -> dict:
            if progress is not None:
                progress(step + 1, config.steps)
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"generation cancelled after step {step + 1} of {config.steps}")
            return {}

        def sample(plan: MemoryPlan) -> Any:
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            with torch.inference_mode(), memory_savers(pipe, plan), graphed_unet(pipe, config.cuda_graphs):
                return pipe(
                    **embeds.as_pipeline_kwargs(),
                    num_inference_steps=config.steps,
                    guidance_scale=guidance,
                    **({"guidance_rescale": rescale} if rescale > 0 else {}),
                    output_type=output_type,
                    width=width,
                    height=height,
                    num_images_per_prompt=1 if prompts is not None else config.num_images,
                    generator=generators,
                    callback_on_step_end=on_step_end,
                ).images

        images, plan = _sample_within_memory(sample, plan, config, pipe, f"{width}x{height}")
    base = dataclasses.asdict(config)
    base.update(guidance=guidance, guidance_rescale=rescale, size=f"{width}x{height}",
                scheduler=scheduler_name(pipe.scheduler), device=device,
                attention_slicing=plan.attention_slicing, vae_tiling=plan.vae_tiling,
                adapters=[{"name": n, "weight": w} for n, w in active.items()])
    base["version"] = _version()
    params = [{**base, "seed": s, "num_images": 1} for s in seeds]
    for record, chosen in zip(params, adapter_sets or []):
        record["adapters"] = [{"name": n, "weight": w} for n, w in chosen.items()]
    for record, text in zip(params, prompts or []):
        record["prompt"] = text
    return GenerateResult(images, params)


def _sample_within_memory(
    sample: Callable[[MemoryPlan], Any], plan: MemoryPlan, config: GenerateConfig, pipe: DiffusionPipeline, size: str
) -> tuple[Any, MemoryPlan]:
    """`sample(plan)`; on an out-of-memory error, once more with every saver the config allows, else a StudioError
    that says what to lower."""
    from studio.memory import savers_offered

    ran_out = object()

    def within(attempt: MemoryPlan) -> Any:
        try:
            return sample(attempt)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            release_memory(plan.device)
            return ran_out

    if (images := within(plan)) is not ran_out:
        return images, plan
    slicing, tiling = savers_offered(pipe)  # a walk of the UNet's processors: only once memory ran out
    retry = dataclasses.replace(
        plan,
        attention_slicing=plan.attention_slicing or (config.attention_slicing is None and slicing),
        vae_tiling=plan.vae_tiling or (config.vae_tiling is None and tiling),
    )
    if retry != plan and (images := within(retry)) is not ran_out:
        return images, retry
    on = [f"--{n}" for n, v in (("attention-slicing", retry.attention_slicing), ("vae-tiling", retry.vae_tiling)) if v]
    off = [f"--{n}" for n, v, ok in (("attention-slicing", retry.attention_slicing, slicing),
                                      ("vae-tiling", retry.vae_tiling, tiling)) if ok and not v]
    raise OutOfMemory(
        f"out of memory on {plan.device} making {config.num_images} image(s) at {size} (estimated "
        f"{human(plan.total)}, {human(plan.free)} free when it started{'; with ' + ' '.join(on) if on else ''}); "
        f"lower --size or --num-images{' or pass ' + ' '.join(off) if off else ''}"
    ) from None


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def output_paths(out: str | Path, count: int) -> tuple[list[Path], Path | None]:
    """Where `count` images go for `--out FILE.png`: FILE.png alone, or FILE-000.png... plus FILE-grid.png."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise StudioError(f"--out must name a .png file, got {out}")
    if count == 1:
        return [out], None
    return [out.with_name(f"{out.stem}-{i:03d}.png") for i in range(count)], out.with_name(f"{out.stem}-grid.png")


def save_result(result: GenerateResult, out: str | Path) -> list[Path]:
    """Write `result` as `studio generate --out` does: FILE.png, or FILE-000.png... and FILE-grid.png, each PNG with
    its parameters; returns the paths written (the grid last)."""
    from studio.pnginfo import save_png

    paths, grid_path = output_paths(out, len(result.images))
    for image, params, path in zip(result.images, result.params, paths):
        save_png(image, path, params)
    if grid_path is None:
        return paths
    save_png(make_grid(result.images), grid_path, {**result.params[0], "num_images": len(result.images)})
    return [*paths, grid_path]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"lora-studio {version('lora-studio')}"
    except PackageNotFoundError:
        return "lora-studio"
