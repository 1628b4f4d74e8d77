"""`studio world train-base`: train the embedded base on Shapes World, in resumable chunks.

Latent diffusion training (Rombach et al., arXiv:2112.10752, eq. 2: L = E ||eps - eps_theta(z_t, t, tau(y))||^2
with z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, DDPM forward process of Ho et al., arXiv:2006.11239, eq. 4),
on accelerate: bf16 autocast on a GPU, fp32 on the CPU. Captions are dropped (empty) 10% of the time so the
model learns the unconditional prediction classifier-free guidance needs (Ho & Salimans, arXiv:2207.12598,
section 3.2). An EMA of the UNet (diffusers' `EMAModel`) is what ships.

Every step's data, noise, timesteps and caption dropout come from generators seeded by (seed, step), so a run
stopped at any step and resumed from its checkpoint gives the same weights as a run straight through. The run
folder holds `checkpoint.pt` (all training state, loaded with `weights_only=True`), `loss.png`, `losses.json`
and `samples/step-NNNNNN.png` grids of fixed prompts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from studio import atomic
from studio.errors import StudioError


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
    steps: int = 20000
    batch_size: int = 256
    lr: float = 2e-4
    warmup: int = 500
    ema_decay: float = 0.9995
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    free_phrasing: float = 0.25  # captions written as users write them (no size word, `in the center`, ...)
    train_text_encoder: bool = False
    text_lr_scale: float = 0.1
    seed: int = 0
    save_every: int = 500
    sample_every: int = 1000
    sample_steps: int = 20
    sample_guidance: float = 5.0
    unet: dict = field(default_factory=dict)  # overrides of base.UNET_CONFIG (rehearsals use a smaller one)
    vae: str = ""  # VAE folder; default the shipped one
    clip: str = ""  # world CLIP folder; default the shipped one


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

    batch = world_batch(config.batch_size, seed=config.seed * 1_000_003 + step, split="train", device=str(device))
    rng = np.random.default_rng([0xCA97, config.seed, step])
    return to_model_range(batch.images), _captions(batch.scenes, rng, config)


def encode_text(tokenizer, text_encoder, captions: list[str], device: torch.device) -> torch.Tensor:  # noqa: ANN001
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]  # (B, 77, width): last hidden state, as SD conditions on


class BaseTrainer:
    """Holds the models and state of one run folder; `train(max_minutes)` advances it and checkpoints."""

    def __init__(self, run_dir: str | Path, config: BaseTrainConfig | None = None) -> None:
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        from studio.models.tokenizer import clip_tokenizer
        from studio.world import base
        from studio.world.vae import VAE_DIR, load_vae

        self.run_dir = Path(run_dir)
        saved = self.run_dir / "config.json"
        if config is None:
            if not saved.is_file():
                raise StudioError(f"{self.run_dir} holds no run; start one with `studio world train-base --run DIR`")
            config = BaseTrainConfig(**json.loads(saved.read_text()))
        elif saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(asdict(config))):
            raise StudioError(f"{self.run_dir} holds a run with other settings; resume it without options, "
                              "or start a new run in another folder")
        self.config = config
        self.accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
        device = self.accelerator.device
        torch.manual_seed(config.seed)  # weight initialisation
        self.unet = base.build_unet({**base.UNET_CONFIG, **config.unet}).to(device).train()
        self.text_encoder = base.initial_text_encoder(config.clip or None).to(device)
        self.text_encoder.requires_grad_(config.train_text_encoder).train(config.train_text_encoder)
        self.vae = load_vae(config.vae or VAE_DIR).to(device).requires_grad_(False)
        self.tokenizer = clip_tokenizer()
        self.noise = base.noise_scheduler()
        groups = [{"params": list(self.unet.parameters()), "lr": config.lr}]
        if config.train_text_encoder:
            groups.append({"params": list(self.text_encoder.parameters()), "lr": config.lr * config.text_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=1e-2)
        self.lr_scheduler = get_scheduler("cosine", self.optimizer, num_warmup_steps=config.warmup,
                                          num_training_steps=config.steps)
        self.ema = EMAModel(self.unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=3 / 4)
        self.ema.to(device)
        self.step, self.losses, self.seconds = 0, [], 0.0
        if (self.run_dir / "checkpoint.pt").is_file():
            self._load()
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_json(saved, asdict(config))

    # -- state ---------------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        state = {
            "step": self.step,
            "seconds": self.seconds,
            "losses": self.losses,
            "unet": self.unet.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }
        if self.config.train_text_encoder:
            state["text_encoder"] = self.text_encoder.state_dict()
        return state

    def save(self) -> None:
        atomic.atomic_write(self.run_dir / "checkpoint.pt", lambda tmp: torch.save(self._state(), tmp))

    def _load(self) -> None:
        path = self.run_dir / "checkpoint.pt"
        try:
            state = torch.load(path, map_location=self.accelerator.device, weights_only=True)
        except Exception as err:
            raise StudioError(f"{path} is damaged ({err}); delete it to restart the run from step 0") from err
        self.unet.load_state_dict(state["unet"])
        if "text_encoder" in state:
            self.text_encoder.load_state_dict(state["text_encoder"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step, self.seconds, self.losses = state["step"], state["seconds"], list(state["losses"])

    # -- training ------------------------------------------------------------------------------------------------
    def loss_at(self, step: int) -> torch.Tensor:
        """The training loss of step `step` (eq. 2 of the LDM paper) with the current weights."""
        device = self.accelerator.device
        images, captions = step_batch(step, self.config, device)
        gen = torch.Generator(device=device).manual_seed(self.config.seed * 7_919 + step)
        with torch.no_grad():
            latents = self.vae.encode(images).latent_dist.sample(gen)  # (B, 4, 16, 16)
            latents = latents * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (latents.shape[0],), generator=gen, device=device)
        noisy = self.noise.add_noise(latents, noise, t)  # z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps
        with torch.set_grad_enabled(self.config.train_text_encoder):
            context = encode_text(self.tokenizer, self.text_encoder, captions, device)  # (B, 77, width)
        with self.accelerator.autocast():
            pred = self.unet(noisy, t, context).sample
        return torch.nn.functional.mse_loss(pred.float(), noise)

    def train(self, max_minutes: float | None = None, progress: bool = True) -> dict:
        """Train until `config.steps` or `max_minutes`, checkpointing every `save_every` steps and at the end."""
        from tqdm import tqdm

        start, last_save = time.time(), self.step
        bar = tqdm(total=self.config.steps, initial=self.step, desc="train-base", disable=not progress)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        while self.step < self.config.steps:
            loss = self.loss_at(self.step)
            if not torch.isfinite(loss):
                raise StudioError(
                    f"loss became {loss.item()} at step {self.step}; the last good checkpoint is kept in "
                    f"{self.run_dir} (step {last_save}); lower --lr and resume"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.ema.step(self.unet.parameters())
            self.step += 1
            self.losses.append(round(loss.item(), 5))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(self.losses[-50:]):.4f}")
            done = self.step == self.config.steps
            out_of_time = max_minutes is not None and time.time() - start > 60 * max_minutes
            if self.step % self.config.sample_every == 0 or done:
                self.write_samples()
            if self.step % self.config.save_every == 0 or done or out_of_time:
                self.seconds += time.time() - start
                start = time.time()
                self.save()
                last_save = self.step
                self.write_loss_curve()
            if out_of_time:
                break
        bar.close()
        return {"step": self.step, "steps": self.config.steps, "seconds": round(self.seconds, 1),
                "loss_last_100": float(np.mean(self.losses[-100:])) if self.losses else math.nan}

    # -- outputs -------------------------------------------------------------------------------------------------
    def ema_pipeline(self):  # -> diffusers.StableDiffusionPipeline (EMA UNet, float32, CPU copies)
        from studio.world.base import assemble, build_unet

        unet = build_unet(self.unet.config)
        self.ema.copy_to(unet.parameters())
        text = self.text_encoder.__class__(self.text_encoder.config)
        text.load_state_dict(self.text_encoder.state_dict())
        vae = self.vae.__class__.from_config(self.vae.config)
        vae.load_state_dict(self.vae.state_dict())
        pipe = assemble(unet.float().cpu().eval(), text.float().cpu().eval(), vae.float().cpu().eval())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def write_samples(self, prompts: tuple[str, ...] = SAMPLE_PROMPTS) -> Path:
        from torchvision.utils import save_image

        pipe = self.ema_pipeline()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            images = pipe(list(prompts), num_inference_steps=self.config.sample_steps, generator=gen,
                          guidance_scale=self.config.sample_guidance, output_type="pt").images  # (N, 3, 64, 64)
        path = self.run_dir / "samples" / f"step-{self.step:06d}.png"
        atomic.atomic_write(path, lambda tmp: save_image(images, tmp, nrow=len(prompts) // 2, format="png"))
        return path

    def write_loss_curve(self) -> Path:
        from studio.plots import line_plot

        atomic.write_json(self.run_dir / "losses.json", self.losses)
        return line_plot(self.losses, self.run_dir / "loss.png", title="train-base loss (epsilon MSE)", smooth=50)


REHEARSAL = {  # the whole recipe at a CPU-minutes scale: same code path, smaller UNet and batch
    "steps": 60,
    "batch_size": 16,
    "warmup": 10,
    "save_every": 20,
    "sample_every": 30,
    "sample_steps": 10,
    "unet": {"block_out_channels": [32, 64, 64]},
}


def run_train_base(args) -> int:  # noqa: ANN001 (argparse.Namespace)
    from studio.world.base import BASE_DIR, export_base

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    options = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr),
                                 ("seed", args.seed)) if v is not None}
    if args.train_text_encoder:
        options["train_text_encoder"] = True
    if (run / "config.json").is_file() and not options and not args.rehearsal:
        trainer = BaseTrainer(run)  # resume as configured
    else:
        config = BaseTrainConfig(**{**(REHEARSAL if args.rehearsal else {}), **options})
        trainer = BaseTrainer(run, config)
    summary = trainer.train(max_minutes=args.max_minutes)
    if args.export is not None and summary["step"] == trainer.config.steps:
        out = Path(args.export) if args.export else BASE_DIR
        extra = {"guidance": trainer.config.sample_guidance, "training": {**asdict(trainer.config), **summary}}
        export_base(trainer.ema_pipeline(), out, extra=extra, card=args.card.read_text() if args.card else None)
        summary["exported"] = str(out)
    print(json.dumps(summary, indent=2))
    return 0


def register_train_base(sub) -> None:  # noqa: ANN001 (argparse subparsers)
    p = sub.add_parser("train-base", help="train the embedded base (resumable chunks; re-run to resume)")
    p.add_argument("--run", default="runs/studio-tiny", help="run folder (checkpoint, samples, loss curve)")
    p.add_argument("--steps", type=int, default=None, help="total steps (default 20000)")
    p.add_argument("--batch-size", type=int, default=None, help="default 256")
    p.add_argument("--lr", type=float, default=None, help="default 2e-4")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--train-text-encoder", action="store_true", help="fine-tune the text tower too (lr x0.1)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (checkpointed) after this long")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--rehearsal", action="store_true", help="the whole recipe at a small scale, on the CPU")
    p.add_argument("--export", nargs="?", const="", default=None,
                   help="when the run is complete, write the model folder (default assets/studio-tiny)")
    p.add_argument("--card", type=Path, default=None, help="model card to ship as README.md")
    p.set_defaults(func=run_train_base)
