"""The embedded base's training recipe (`studio world train-base`): Shapes World, in resumable chunks.

The `full` method (trainers/methods/full.py: every UNet weight, an EMA that ships) on the shared training loop
(trainers/loop.py: latent diffusion's objective, Rombach et al., arXiv:2112.10752, eq. 2; accelerate; bf16 on a
GPU, fp32 on the CPU; exact resume). What is the base's own is its data: an endless stream of fresh Shapes World
scenes, every micro-batch a pure function of (seed, micro-batch index); captions dropped (empty) 10% of the time
so the model learns the unconditional prediction classifier-free guidance needs (Ho & Salimans,
arXiv:2207.12598, section 3.2), and a quarter written in free phrasings as users write them.

The run folder holds `config.json`, `checkpoint.pt` (read with `weights_only=True`), `loss.png`, `losses.json` and
`samples/step-NNNNNN.png` grids of fixed prompts; re-running the same command resumes it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from studio import atomic
from studio.configs import check_numbers
from studio.errors import StudioError


if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from trainers.config import TrainConfig


SAMPLE_PROMPTS = (
    "a large red circle on the left on a white background",
    "a large blue square on the right on a black background",
    "a small yellow star on the top on a gray background",
    "a large green triangle in the center on a beige background",
    "a large purple ring on the left and a large orange cross on the right on a white background",
    "a small white heart on the bottom on a black background",
    "a red star",
    "a large blue diamond on the top and a small yellow circle on the bottom on a gray background",
)


@dataclass
class BaseTrainConfig:
    steps: int = 6000
    batch_size: int = 64
    lr: float = 3e-4
    warmup: int = 300
    snr_gamma: float = 5.0  # Min-SNR-gamma loss weights (Hang et al., arXiv:2303.09556): layout is learnt sooner
    ema_decay: float = 0.9995
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    free_phrasing: float = 0.25  # captions written as users write them (no size word, `in the center`, ...)
    max_objects: int = 3  # scenes hold 1..max_objects objects (1: a placement curriculum)
    max_length: int = 77  # the tokenizer's context (world captions need at most 36 tokens)
    train_text_encoder: bool = False
    text_lr_scale: float = 0.1
    seed: int = 0
    save_every: int = 250
    sample_every: int = 1000
    sample_steps: int = 20
    guidance: float = 5.0  # the guidance the exported model recommends (its studio.json)
    unet: dict = field(default_factory=dict)  # overrides of base.UNET_CONFIG (rehearsals use a smaller one)
    scheduler: dict = field(default_factory=dict)  # overrides of base.SCHEDULER_CONFIG (e.g. base.ZERO_SNR)
    init: str = ""  # a model folder whose UNet starts the run (a second stage); default: random, seeded
    init_text_encoder: bool = False  # the text encoder starts from `init` too (else from the world CLIP)
    vae: str = ""  # VAE folder; default the shipped one
    clip: str = ""  # world CLIP folder; default the shipped one

    def __post_init__(self) -> None:
        check_numbers(self)
        if not 1 <= self.max_objects <= 3:
            raise StudioError(f"--max-objects must be 1, 2 or 3 (Shapes World scenes), got {self.max_objects}")
        if not 8 <= self.max_length <= 77:
            raise StudioError(f"--max-length must be 8-77 (the text encoder has 77 positions), got {self.max_length}")


def _captions(scenes: list, rng: np.random.Generator, config: BaseTrainConfig) -> list[str]:
    from studio.world.grammar import free_caption

    out = []
    for scene in scenes:
        u = rng.random()
        if u < config.caption_dropout:
            out.append("")
        elif u < config.caption_dropout + config.free_phrasing:
            out.append(free_caption(scene, rng))
        else:
            out.append(scene.caption())
    return out


def step_batch(step: int, config: BaseTrainConfig, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """The images (B, 3, 64, 64) in [-1, 1] and captions of training step `step`: a pure function of (seed, step)."""
    from studio.world.datasets import world_batch
    from studio.world.renderer import to_model_range

    batch = world_batch(config.batch_size, seed=config.seed * 1_000_003 + step, split="train",
                        objects=(1, config.max_objects), device=str(device))
    rng = np.random.default_rng([0xCA97, config.seed, step])
    return to_model_range(batch.images), _captions(batch.scenes, rng, config)


def scene_stream(config: BaseTrainConfig) -> Callable[[int, int], tuple[torch.Tensor, list[str]]]:
    """The base's data for the shared loop: (start, count) -> `step_batch` of micro-batch start // count."""

    def stream(start: int, count: int) -> tuple[torch.Tensor, list[str]]:
        return step_batch(start // count, replace(config, batch_size=count), torch.device("cpu"))

    return stream


def initial_unet(unet, folder: str) -> list[str]:  # noqa: ANN001 (diffusers.UNet2DConditionModel)
    """Load the UNet weights of the model folder `folder` into `unet`, in float32; return the names left as seeded.

    The run's UNet may grow the folder's (e.g. attention added at a resolution that had none): every weight the
    folder has must exist here with the same shape; weights only this UNet has keep their seeded initialisation.
    """
    from diffusers import UNet2DConditionModel

    path = Path(folder) / "unet"
    if not (path / "config.json").is_file():
        raise StudioError(f"--init {folder}: no unet/ folder there; name a diffusers model folder")
    source = UNet2DConditionModel.from_pretrained(path, torch_dtype=torch.float32).state_dict()
    target = unet.state_dict()
    if any(k not in target or target[k].shape != v.shape for k, v in source.items()):
        raise StudioError(f"--init {folder}: its UNet has another architecture than this run's (and is not a part of "
                          "it); use a matching model")
    unet.load_state_dict(source, strict=False)
    return sorted(set(target) - set(source))


class BaseTrainer:
    """One run folder of base training: the `full` method (trainers/methods/full.py) on the shared loop."""

    def __init__(self, run_dir: str | Path, config: BaseTrainConfig | None = None, *, device: str = "auto") -> None:
        from studio.models.tokenizer import clip_tokenizer  # noqa: F401 (fail early without open_clip's BPE)
        from studio.world import base
        from studio.world.vae import VAE_DIR, load_vae
        from trainers.methods.full import Full, FullConfig

        self.run_dir, self.device = Path(run_dir), device  # the device is the machine's, not the run's: a run resumes
        saved = self.run_dir / "config.json"
        if config is None:
            if not saved.is_file():
                raise StudioError(f"{self.run_dir} holds no run; start one with `studio world train-base --run DIR`")
            config = BaseTrainConfig(**json.loads(saved.read_text()))
        elif saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(asdict(config))):
            raise StudioError(f"{self.run_dir} holds a run with other settings; resume it without options, "
                              "or start a new run in another folder")
        self.config = config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not saved.is_file():
            atomic.write_json(saved, asdict(config))
        torch.manual_seed(config.seed)  # the UNet's initialisation
        unet = base.build_unet({**base.UNET_CONFIG, **config.unet})
        if config.init:
            initial_unet(unet, config.init)
        if config.init_text_encoder:
            from transformers import CLIPTextModel

            folder = Path(config.init) / "text_encoder"
            if not (folder / "config.json").is_file():
                raise StudioError(f"--init-text-encoder: {config.init} has no text_encoder/ folder; name a model "
                                  "folder exported by train-base, or leave the flag out to start from the world CLIP")
            text = CLIPTextModel.from_pretrained(folder, torch_dtype=torch.float32)
        else:
            text = base.initial_text_encoder(config.clip or None)
        self.pipe = base.assemble(unet, text, load_vae(config.vae or VAE_DIR), config.scheduler, config.max_length)
        self.pipe.set_progress_bar_config(disable=True)
        self.method = Full(FullConfig(lr=config.lr, ema_decay=config.ema_decay, text_lr_scale=config.text_lr_scale,
                                      train_text_encoder=config.train_text_encoder))
        self.loop = None
        self._resume = (self.run_dir / "checkpoint.pt").is_file()
        if self._resume:
            self._state_on_disk()  # a damaged checkpoint is reported now, before any work

    def _state_on_disk(self) -> dict:
        path = self.run_dir / "checkpoint.pt"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise StudioError(f"{path} is damaged ({err}); delete it to restart the run from step 0") from err

    def train_config(self, progress: bool = True) -> TrainConfig:
        from trainers.config import TrainConfig

        c = self.config
        return TrainConfig(
            trigger="", name="studio-tiny", world_scenes=True, train_steps=c.steps, batch_size=c.batch_size,
            lr_scheduler="cosine", lr_warmup_steps=c.warmup, snr_gamma=c.snr_gamma, save_every=c.save_every,
            sample_every=c.sample_every,
            sample_steps=c.sample_steps, sample_prompts=list(SAMPLE_PROMPTS), seed=c.seed, run_dir=str(self.run_dir),
            progress=progress, device=self.device,
        )

    def train(self, max_minutes: float | None = None, progress: bool = True, cancel=None) -> dict:  # noqa: ANN001
        """Train until `config.steps`, `max_minutes` or `cancel()`; a stop leaves a checkpoint to resume from."""
        from trainers.data import TrainData
        from trainers.loop import Loop

        if self.loop is None:
            data = TrainData(torch.zeros(0, 3, 64, 64), [], "base", None, list(SAMPLE_PROMPTS), "Shapes World scenes",
                             stream=scene_stream(self.config), resolution=64)
            self.loop = Loop(self.method, self.pipe, data, self.train_config(progress), self.run_dir,
                             resume=self._resume)
        deadline = None if max_minutes is None else time.time() + 60 * max_minutes
        self.loop.cancel = lambda: (deadline is not None and time.time() >= deadline) or bool(cancel and cancel())
        start = time.time()
        result = self.loop.run()
        self._resume = True
        return {"status": result.status, "step": result.step, "steps": self.config.steps,
                "seconds": round(time.time() - start, 1),
                "loss_last_100": float(np.mean(result.losses[-100:])) if result.losses else math.nan}

    @property
    def step(self) -> int:
        return self.loop.step if self.loop is not None else int(self._state_on_disk()["step"]) if self._resume else 0

    @property
    def losses(self) -> list[float]:
        return list(self.loop.losses) if self.loop is not None else []

    def ema_pipeline(self) -> StableDiffusionPipeline:  # EMA UNet, float32, CPU copies
        from studio.world.base import assemble

        text = self.pipe.text_encoder.__class__(self.pipe.text_encoder.config)
        text.load_state_dict(self.pipe.text_encoder.state_dict())
        vae = self.pipe.vae.__class__.from_config(self.pipe.vae.config)
        vae.load_state_dict(self.pipe.vae.state_dict())
        text, vae = text.float().cpu().eval(), vae.float().cpu().eval()
        pipe = assemble(self.method.ema_unet(), text, vae, self.config.scheduler, self.config.max_length)
        pipe.set_progress_bar_config(disable=True)
        return pipe


REHEARSAL = {  # the whole recipe at a CPU-minutes scale: same code path, smaller UNet and batch
    "steps": 60,
    "batch_size": 16,
    "warmup": 10,
    "save_every": 20,
    "sample_every": 30,
    "sample_steps": 10,
    "unet": {"block_out_channels": [32, 64, 64]},
}
