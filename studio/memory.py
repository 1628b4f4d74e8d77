"""Memory a generation needs, estimated from the pipeline's configs before anything is allocated.

`plan_memory` compares the estimate with what the device has free: a request that fits runs as asked; one that fits
only with diffusers' memory savers (VAE tiling and slicing; attention slicing where attention materialises its scores)
runs with them switched on; one that cannot fit is refused with the estimate and the free memory in the message, where
the kernel's out-of-memory killer would otherwise end the process mid-sampling with nothing said.

The estimate is an upper bound made of the phases that do not overlap in time (sampling, then decoding):

    latents   B x C_lat x h x w, a few copies (latents, the model input, the noise prediction, guidance arithmetic)
    unet      K_UNET x B x sum_i C_i x h_i x w_i: the activations of every UNet level i (skip connections, resnets,
              transformer blocks with their feed-forward) as a multiple of one feature map per level
    attention B x heads x N^2 at the largest resolution with attention, N = tokens there, when the attention
              processor materialises the scores (diffusers' `AttnProcessor`); `slice x N^2` with attention slicing;
              O(N) for PyTorch 2's scaled_dot_product_attention (flash / memory-efficient kernels), counted in `unet`
    vae       K_VAE x n x max_stage C x H_s x W_s: the decoder's largest feature map, a few alive at once; with tiling
              the same for one tile, plus the tiles and the blended image kept until they are joined
    output    the decoded images as float tensors, a NumPy copy and the 8-bit images

    overhead  a constant for prompt encoding and working buffers

with h x w = (H / f) x (W / f) the latent size, f the VAE factor, B = n images (x2 with classifier-free guidance).
K_UNET, K_VAE and the overhead are measured, not derived (`studio bench memory` prints the table of peak RSS over
the estimate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from studio.errors import OutOfMemory
from studio.sizes import human


K_UNET = 28  # live UNet feature maps per level (measured 16-24 on studio-tiny at 256-1024 px, flash attention)
K_VAE = 6  # live decoder feature maps of the largest stage (measured 4.4-5.4)
OVERHEAD = 64 * 2**20  # prompt encoding, the allocator's and the attention kernels' working buffers, small images
LATENT_COPIES = 6
OUTPUT_BYTES_PER_VALUE = 10  # float32 image tensor + float32 NumPy copy + uint8 array + PIL image
_EFFICIENT = ("2_0", "XFormers", "NPU", "Flash")  # processors on fused kernels: no N x N scores in memory


@dataclasses.dataclass
class MemoryPlan:
    """What a request needs (bytes, by phase), what the device has free, and the savers it runs with."""

    parts: dict[str, int]
    free: int
    device: str
    attention_slicing: bool
    vae_tiling: bool

    @property
    def total(self) -> int:
        p = self.parts
        return p["overhead"] + p["latents"] + max(p["unet"] + p["attention"], p["vae"] + p["output"])

    def describe(self) -> str:
        parts = ", ".join(f"{k} {human(v)}" for k, v in self.parts.items() if v)
        return f"about {human(self.total)} ({parts}); {self.device} has {human(self.free)} free"


def _processor_kind(processor: Any) -> tuple[str, int]:
    """("efficient" | "sliced" | "full", slice size) of an attention processor."""
    name = type(processor).__name__
    if "Sliced" in name:
        return "sliced", int(getattr(processor, "slice_size", 1) or 1)
    if any(tag in name for tag in _EFFICIENT):
        return "efficient", 0
    return "full", 0  # AttnProcessor, and any processor the studio does not know: scores assumed materialised


def _attention_scores(model: torch.nn.Module, batch: int, tokens: dict[str, int], itemsize: int) -> int:
    """The largest attention score tensor of `model`'s self-attention layers (0 when every one is fused)."""
    from diffusers.models.attention_processor import Attention

    largest = 0
    for name, module in model.named_modules():
        if not isinstance(module, Attention) or module.is_cross_attention:
            continue
        n = next((v for prefix, v in tokens.items() if name.startswith(prefix)), 0)
        kind, slice_size = _processor_kind(module.processor)
        if kind == "full":
            largest = max(largest, batch * module.heads * n * n * itemsize)  # (B * heads, N, N)
        elif kind == "sliced":
            largest = max(largest, min(slice_size, batch * module.heads) * n * n * itemsize)  # (slice, N, N)
    return largest


def _unet_tokens(unet: torch.nn.Module, h: int, w: int) -> dict[str, int]:
    """Module-name prefix -> tokens (pixels of its feature map) for each UNet block."""
    levels = len(unet.config.block_out_channels)
    side = [(math.ceil(h / 2**i), math.ceil(w / 2**i)) for i in range(levels)]
    out = {f"down_blocks.{i}.": side[i][0] * side[i][1] for i in range(levels)}
    out.update({f"up_blocks.{j}.": side[levels - 1 - j][0] * side[levels - 1 - j][1] for j in range(levels)})
    out["mid_block."] = side[-1][0] * side[-1][1]
    return out


def _decoder_peak(vae: torch.nn.Module, h: int, w: int) -> int:
    """Values in the decoder's largest feature map for one image of latent size h x w."""
    channels = list(reversed(vae.config.block_out_channels))
    largest = 0
    for i, c in enumerate(channels):  # up block i runs at the latent size x 2^i; its input came from block i-1
        before = channels[i - 1] if i else c
        largest = max(largest, max(c, before) * (h * 2**i) * (w * 2**i))
    return largest


def parameter_of(model: torch.nn.Module) -> torch.Tensor:
    """The model's first parameter, whose device and dtype are the model's. diffusers' `ModelMixin.device` and
    `.dtype` walk every module looking for offloading hooks (about 1 ms each for studio-tiny's UNet on 2 CPU cores),
    which a call's fixed cost would pay several times over."""
    return next(model.parameters())


def estimate(
    pipe: Any, width: int, height: int, num_images: int, guided: bool, *, attention_slicing: bool, vae_tiling: bool
) -> dict[str, int]:
    """Bytes by phase (see the module docstring) for one call of `pipe` at `width` x `height`."""
    unet, vae = pipe.unet, pipe.vae
    f = pipe.vae_scale_factor
    h, w = math.ceil(height / f), math.ceil(width / f)
    batch = num_images * (2 if guided else 1)
    unet_size = torch.finfo(parameter_of(unet).dtype).bits // 8
    vae_size = torch.finfo(parameter_of(vae).dtype).bits // 8
    latents = LATENT_COPIES * batch * unet.config.in_channels * h * w * 4
    levels = [c * math.ceil(h / 2**i) * math.ceil(w / 2**i) for i, c in enumerate(unet.config.block_out_channels)]
    activations = K_UNET * batch * sum(levels) * unet_size
    if attention_slicing:  # what `enable_attention_slicing("max")` leaves: one head of one image at a time
        scores = _attention_scores_if_sliced(unet, _unet_tokens(unet, h, w), unet_size)
    else:
        scores = _attention_scores(unet, batch, _unet_tokens(unet, h, w), unet_size)
    images = 1 if vae_tiling else num_images  # VAE slicing decodes one image at a time
    tile = vae.tile_latent_min_size if vae_tiling and max(h, w) > vae.tile_latent_min_size else 0
    if tile:
        decode = K_VAE * _decoder_peak(vae, tile, tile) * vae_size
        kept = 4 * 3 * width * height * vae_size  # decoded tiles (overlapping), blended rows, the joined image
        decode += kept + _attention_scores(vae, 1, {"decoder.mid_block.": tile * tile}, vae_size)
    else:
        decode = K_VAE * images * _decoder_peak(vae, h, w) * vae_size
        decode += _attention_scores(vae, images, {"decoder.mid_block.": h * w}, vae_size)
    output = num_images * 3 * width * height * OUTPUT_BYTES_PER_VALUE
    return {"overhead": OVERHEAD, "latents": latents, "unet": activations, "attention": scores, "vae": decode,
            "output": output}


def _attention_scores_if_sliced(unet: torch.nn.Module, tokens: dict[str, int], itemsize: int) -> int:
    """Scores once `enable_attention_slicing("max")` puts SlicedAttnProcessor(1) on every layer: one (N, N)."""
    from diffusers.models.attention_processor import Attention

    largest = 0
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and not module.is_cross_attention:
            n = next((v for prefix, v in tokens.items() if name.startswith(prefix)), 0)
            largest = max(largest, n * n * itemsize)  # (1, N, N)
    return largest


def free_memory(device: str | torch.device) -> int:
    """Bytes the device can still give: CUDA's free memory plus torch's unused cache; on the CPU the kernel's
    MemAvailable, lowered to the cgroup's limit when the process runs in a container with one."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        return int(free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))
    import psutil

    available = int(psutil.virtual_memory().available)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(available, 0)


def savers_offered(pipe: Any) -> tuple[bool, bool]:
    """(attention slicing helps, VAE tiling exists). Slicing helps only where every processor is diffusers' plain
    `AttnProcessor`, which materialises the scores: it would replace fused SDPA kernels (already O(N)) with slices
    of N x N, and a composer's own processors must stay."""
    from diffusers.models.attention_processor import AttnProcessor

    procs = list(pipe.unet.attn_processors.values())
    plain = bool(procs) and all(type(p) is AttnProcessor for p in procs)
    slicing = hasattr(pipe, "enable_attention_slicing") and plain
    return slicing, hasattr(pipe.vae, "enable_tiling")


def plan_memory(
    pipe: Any,
    width: int,
    height: int,
    num_images: int,
    guided: bool,
    device: str,
    *,
    attention_slicing: bool | None = None,
    vae_tiling: bool | None = None,
    free: int | None = None,
) -> MemoryPlan:
    """The savers a request runs with (None: on only when needed), or `OutOfMemory` (a StudioError) when nothing
    makes it fit."""
    free = free_memory(device) if free is None else free

    def plan(slicing: bool, tiling: bool) -> MemoryPlan:
        parts = estimate(pipe, width, height, num_images, guided, attention_slicing=slicing, vae_tiling=tiling)
        return MemoryPlan(parts, free, str(device), slicing, tiling)

    asked = plan(bool(attention_slicing), bool(vae_tiling))
    if asked.total <= free:
        return asked
    offered_slicing, offered_tiling = savers_offered(pipe)  # a walk of the UNet: only when the request does not fit
    saving = plan(
        bool(attention_slicing) or (attention_slicing is None and offered_slicing),
        bool(vae_tiling) or (vae_tiling is None and offered_tiling),
    )
    if saving.total <= free:
        return saving
    tried = [name for name, on in (("attention slicing", saving.attention_slicing), ("VAE tiling", saving.vae_tiling))
             if on]
    savers = f" even with {' and '.join(tried)}" if tried else ""
    raise OutOfMemory(
        f"{num_images} image(s) at {width}x{height} need {saving.describe()}{savers}; lower --size or --num-images"
    )


@contextlib.contextmanager
def memory_savers(pipe: Any, plan: MemoryPlan) -> Iterator[None]:
    """Switch on the plan's savers for the block, then put the pipeline back as it was (it is cached and shared)."""
    processors = dict(pipe.unet.attn_processors) if plan.attention_slicing else None
    vae = pipe.vae
    tiling, slicing = getattr(vae, "use_tiling", False), getattr(vae, "use_slicing", False)
    try:
        if plan.attention_slicing:
            pipe.enable_attention_slicing("max")
        if plan.vae_tiling:
            vae.enable_tiling()
            vae.enable_slicing()
        yield
    finally:
        if processors is not None:
            pipe.unet.set_attn_processor(processors)
        vae.use_tiling, vae.use_slicing = tiling, slicing


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator refusing a tensor."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def release_memory(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
