"""The one training loop (DESIGN.md section 5): any `Method` on any SD1 / SD2 / SDXL pipeline, on accelerate.

Objective: latent diffusion (Rombach et al., arXiv:2112.10752, Eq. 2) with DDPM's forward process (Ho et al.,
arXiv:2006.11239, Eq. 4), z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps with t ~ U{0, ..., T-1}; the target is eps,
or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 for v-prediction models (Salimans & Ho, arXiv:2202.00512, section 4),
or z_0, as the scheduler config says. With prior preservation a micro-batch is instance ++ class images and the loss
adds lambda * MSE on the class half (DreamBooth, Ruiz et al., arXiv:2208.12242, Eq. 2). AdamW, gradient clipping,
gradient accumulation, bf16 autocast on a GPU with frozen weights in bf16 and trained tensors in fp32, fp32 on a CPU.

Exact resume: micro-step m (= step * grad_accum + k) takes its images from seeded per-epoch permutations and its
latent sample, noise and timesteps from a generator seeded by (seed, m, process), and reseeds torch's global
generator (dropout) the same way. The checkpoint (`checkpoint.pt`, read with weights_only=True) holds the method's
tensors, the optimizer, the lr scheduler, step, losses and the gradients of an open accumulation window, so a run
stopped anywhere (cancel, crash after a save) and resumed ends bit-identical to a run straight through. NaN guard:
a non-finite loss or gradient stops the run, and a checkpoint is only written when the loss of the state it holds
is finite, so a diverged run keeps its last good one.
Several processes (`accelerate launch`) split each batch and average gradients before every optimizer step.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from studio.distributed import wait_for_everyone
from studio.errors import StudioError
from studio.schedulers import training_target
from trainers.checkpoint import read_checkpoint, record_rank, remove_stale_temporaries, restore, save_run
from trainers.config import TrainConfig
from trainers.data import TrainData
from trainers.frozen import cast_frozen, posterior, set_training_modes
from trainers.graphs import recorder
from trainers.method import Method
from trainers.objective import diffusion_loss, min_snr_weights
from trainers.previews import previews, save_grid
from trainers.streams import accelerator, epoch_indices, seeded


SYNC_EVERY = 25  # optimizer steps between host reads of the loss on a GPU
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_DATA, _CLASS, _NOISE, _GLOBAL = 0, 1, 2, 3  # generator streams
_NOISE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)

Cancel = threading.Event | Callable[[], bool] | None


@dataclass
class Callbacks:
    on_step: Callable[[int, float], None] | None = None  # after each optimizer step: (step, mean loss of the step)
    # previews: (step, PIL images, one per sample prompt; each image's `info` holds its "prompt" and "seed")
    on_sample: Callable[[int, list[Any]], None] | None = None
    on_checkpoint: Callable[[int], None] | None = None  # after a checkpoint is written: (its step)
    on_done: Callable[[Any], None] | None = None  # once, last: the LoopResult (trainers.train: the TrainResult)


@dataclass
class LoopResult:
    status: str  # "done" | "cancelled"
    step: int
    losses: list[float]
    run_dir: Path
    samples: list[Any] = field(default_factory=list)  # previews of the finished run, one per sample prompt
    sample_prompts: list[str] = field(default_factory=list)


def _reads_every(device: torch.device, callbacks: Callbacks) -> int:
    """Optimizer steps between host reads of the loss: every step on the CPU (a read costs nothing there) or when a
    callback wants each step's loss, else SYNC_EVERY."""
    return SYNC_EVERY if device.type == "cuda" and callbacks.on_step is None else 1


class Loop:
    """One run: set up by `__init__` (class images, latents, attach, optimizer, resume), advanced by `run()`."""

    def __init__(
        self,
        method: Method,
        pipe: Any,
        data: TrainData,
        config: TrainConfig,
        run_dir: Path,
        *,
        callbacks: Callbacks | None = None,
        cancel: Cancel = None,
        resume: bool = False,
    ) -> None:
        from diffusers import DDPMScheduler, StableDiffusionXLPipeline
        from diffusers.optimization import get_scheduler

        c = self.config = config
        self.method, self.pipe, self.data, self.run_dir = method, pipe, data, Path(run_dir)
        self.callbacks, self.cancel = callbacks or Callbacks(), cancel
        # Autocast is ours: accelerate's state is process-wide and refuses a second precision in one process (UI).
        self.accelerator = accelerator(c.device)
        self.device = self.accelerator.device
        auto = "bf16" if self.device.type == "cuda" else "no"
        self.bf16 = (auto if c.mixed_precision == "auto" else c.mixed_precision) == "bf16"
        self.models: dict[str, nn.Module] = {
            name: getattr(pipe, name) for name in COMPONENTS if isinstance(getattr(pipe, name, None), nn.Module)
        }
        pipe.to(self.device)
        for model in self.models.values():
            model.requires_grad_(False).eval()
        self.sdxl = isinstance(pipe, StableDiffusionXLPipeline)
        source = pipe.scheduler.config  # the training process of any sampler's config: betas, T, prediction type
        self.noise = DDPMScheduler(**{k: source[k] for k in _NOISE_KEYS if k in source})
        self.resolution = data.size

        # Frozen-base work first: class images and the VAE posteriors of every training image (a stream's are
        # computed batch by batch).
        self.instance = posterior(self.models["vae"], data.images, self.device) if data.stream is None else None
        self.prior = None
        if data.class_prompts:
            from trainers.prior import class_images

            with self.autocast():
                images = class_images(
                    pipe,
                    data.class_prompts,
                    c.num_class_images,
                    self.resolution,
                    steps=c.sample_steps,
                    progress=c.progress,
                )
            self.prior = posterior(self.models["vae"], images, self.device)

        torch.manual_seed(c.seed)  # the adapter's initialisation
        method.attach(pipe)
        self.trainable = method.trainable_tensors()
        if not self.trainable:
            raise StudioError(f"method {type(method).__name__} attached no trainable tensors; check its targets")
        on_gpu = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(  # fused on a GPU: one kernel for every tensor's update
            method.trainable_parameters(), lr=method.config.lr, weight_decay=c.weight_decay, fused=on_gpu or None
        )
        # Reading a loss or a norm on the host waits for the GPU; a GPU run reads them every SYNC_EVERY steps (and
        # before any checkpoint, which is only written when its probe loss is finite), unless a callback wants each.
        self.sync_every = _reads_every(self.device, self.callbacks)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        schedule = "constant_with_warmup" if c.lr_scheduler == "constant" and c.lr_warmup_steps else c.lr_scheduler
        self.lr_scheduler = get_scheduler(
            schedule, self.optimizer, num_warmup_steps=c.lr_warmup_steps, num_training_steps=c.train_steps
        )
        if self.bf16:
            cast_frozen(self.models, self.trainable)
        # A text encoder trains when a trained tensor is named for it (`text_encoder.<module>...`), injected or hooked.
        self.text_trainable = any(name.startswith("text_encoder") for name in self.trainable)
        set_training_modes(self.models, self.text_trainable, c.gradient_checkpointing)

        self.graphs = recorder(method, pipe, self.device, c)  # `--cuda-graphs`, where it can follow
        self.step, self.losses, self.window, self.saved_step = 0, [], [], None
        self.seen: list[int] = []  # data positions (first sample of each micro-batch) this process trained on
        if resume:
            self.load()

    # -- set-up helpers ----------------------------------------------------------------------------------------------
    def autocast(self) -> torch.autocast:
        # a recording needs the weight-cast cache off (`torch.cuda.make_graphed_callables`)
        cache = not (self.config.cuda_graphs and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=cache)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the run's device; to a GPU from pinned memory, since a copy from pageable memory makes the
        host wait for the GPU's queue to drain (one sync per step)."""
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    # -- one micro-step ----------------------------------------------------------------------------------------------
    def _predict(self, zt: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The UNet's prediction (B, C, R/f, R/f) for the prompts, with the embeddings generation uses (gradients
        through a trained text encoder), replayed where the step is recorded (`--cuda-graphs`)."""
        from studio.prompts import encode_tokens, prompt_tokens

        tokens = tuple(self._to_device(ids) for ids in prompt_tokens(self.pipe, prompts))  # (B, 77) each
        time_ids = None
        if self.sdxl:  # SDXL micro-conditioning (arXiv:2307.01952, section 2.2): original, crop, target size
            r = self.resolution
            time_ids = self._to_device(torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32).repeat(len(zt), 1))
        if self.graphs is not None:
            return self.graphs(tokens, zt, t, time_ids, self.text_trainable)
        with torch.set_grad_enabled(self.text_trainable and torch.is_grad_enabled()):
            hidden, pooled = encode_tokens(self.pipe, tokens)  # (B, 77, D), SDXL (B, P)
        added = None if time_ids is None else {"text_embeds": pooled, "time_ids": time_ids}
        return self.models["unet"](zt, t, hidden, added_cond_kwargs=added).sample

    def micro_loss(self, m: int) -> torch.Tensor:
        """The loss of micro-step m: a pure function of (seed, m, process) and the current weights."""
        c, acc = self.config, self.accelerator
        batch, start = c.batch_size, (m * acc.num_processes + acc.process_index) * c.batch_size
        torch.manual_seed(seeded(c.seed, _GLOBAL, m, acc.process_index).initial_seed())  # dropout
        if self.data.stream is None:
            idx = epoch_indices(c.seed, _DATA, start, batch, len(self.data.prompts))
            mean, std = self.instance[0][idx], self.instance[1][idx]
            prompts = [self.data.prompts[i] for i in idx]
        else:
            images, prompts = self.data.stream(start, batch)  # (B, 3, R, R) in [-1, 1]
            mean, std = posterior(self.models["vae"], images, self.device, len(images))
        if self.prior is not None:
            cidx = epoch_indices(c.seed, _CLASS, start, batch, len(self.prior[0]))
            mean, std = torch.cat([mean, self.prior[0][cidx]]), torch.cat([std, self.prior[1][cidx]])
            prompts += [self.data.class_prompts[i % len(self.data.class_prompts)] for i in cidx]
        g = seeded(c.seed, _NOISE, m, acc.process_index)
        vae = self.models["vae"].config
        z0 = mean + std * torch.randn(mean.shape, generator=g)  # a sample of q(z | x)
        z0 = (z0 - (getattr(vae, "shift_factor", None) or 0.0)) * vae.scaling_factor  # (B, C, R/f, R/f)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (len(z0),), generator=g)
        z0, noise, t = (self._to_device(x) for x in (z0, noise, t))
        zt = self.noise.add_noise(z0, noise, t)  # z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps
        target = training_target(self.noise, z0, noise, t)
        with self.autocast():
            pred = self._predict(zt, t, prompts)  # (B, C, R/f, R/f)
        weights = min_snr_weights(self.noise, t, c.snr_gamma) if c.snr_gamma > 0 else None
        loss = diffusion_loss(pred, target, batch if self.prior is not None else 0, c.prior_loss_weight, weights)
        reg = self.method.regularizer(self.step)
        return loss if reg is None else loss + reg

    # -- the run -----------------------------------------------------------------------------------------------------
    def _cancelled(self) -> bool:
        if self.cancel is None:
            return False
        return self.cancel.is_set() if isinstance(self.cancel, threading.Event) else bool(self.cancel())

    def _diverged(self, what: str) -> StudioError:
        group = self.optimizer.param_groups[0]
        lr = group.get("initial_lr", group["lr"])  # the --lr given, not where the schedule has taken it
        if self.saved_step is None:
            advice = f"no checkpoint was saved before it; lower --lr (now {lr:g}) and start again"
        else:
            advice = (
                f"the last good checkpoint (step {self.saved_step}) is kept in {self.run_dir}; lower --lr "
                f"(now {lr:g}) and resume with --resume latest"
            )
        return StudioError(f"{what} at step {self.step + 1}: training diverged and stopped; {advice}")

    def _settle(self) -> None:
        """Losses still on the device become numbers (one wait for the GPU); a non-finite one stops the run."""
        pending = [i for i, v in enumerate(self.losses) if isinstance(v, torch.Tensor)]
        if pending:
            values = torch.stack([self.losses[i].float() for i in pending]).tolist()
            for i, v in zip(pending, values):
                self.losses[i] = v
            bad = next((i for i, v in zip(pending, values) if not math.isfinite(v)), None)
            if bad is not None:
                raise self._diverged(f"the loss became {values[pending.index(bad)]} (first at step {bad + 1})")
        self.window = [v.item() if isinstance(v, torch.Tensor) else v for v in self.window]

    def _optimizer_step(self) -> None:
        c, params = self.config, list(self.trainable.values())
        if self.accelerator.num_processes > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, "mean")
        norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm > 0 else math.inf)
        if self.sync_every == 1 and not torch.isfinite(norm):
            raise self._diverged(f"the gradient norm became {norm.item()}")
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.on_step_end(self.step)
        self.losses.append(sum(self.window) / len(self.window))
        self.window = []
        self.step += 1

    def run(self) -> LoopResult:
        from tqdm import tqdm

        c, cb = self.config, self.callbacks
        bar = tqdm(
            total=c.train_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (c.progress and self.accelerator.is_main_process),
        )
        status = "done"
        try:
            while self.step < c.train_steps:
                if self._cancelled():
                    status = "cancelled"
                    break
                m = self.step * c.grad_accum + len(self.window)
                self.seen.append((m * self.accelerator.num_processes + self.accelerator.process_index) * c.batch_size)
                loss = self.micro_loss(m)
                if self.sync_every == 1 and not torch.isfinite(loss):
                    raise self._diverged(f"the loss became {loss.item()}")
                self.accelerator.backward(loss / c.grad_accum)
                self.window.append(loss.item() if self.sync_every == 1 else loss.detach())
                if len(self.window) < c.grad_accum:
                    continue
                self._optimizer_step()
                bar.update(1)
                if self.step % self.sync_every == 0 or self.step == c.train_steps:
                    self._settle()
                    bar.set_postfix(loss=f"{np.mean(self.losses[-20:]):.4f}")
                if cb.on_step:
                    cb.on_step(self.step, self.losses[-1])
                if (c.save_every and self.step % c.save_every == 0) or self.step == c.train_steps:
                    self.save()
                if c.sample_every and self.step % c.sample_every == 0 and self.step < c.train_steps:
                    self.preview()
        finally:
            bar.close()
        self._settle()
        if status == "cancelled":
            self.save()
        acc = self.accelerator
        record_rank(self.run_dir, acc.process_index, acc.num_processes, status, self.step, self.seen, self.trainable)
        result = LoopResult(status, self.step, list(self.losses), self.run_dir)
        result.sample_prompts = list(self.data.sample_prompts)
        if status == "done" and self.data.sample_prompts:
            result.samples = self.preview()
        if cb.on_done:
            cb.on_done(result)
        return result

    def preview(self) -> list[Any]:
        """Fixed-seed previews of the sample prompts with the adapter as it is now (seed + i for prompt i)."""
        c = self.config
        with self.autocast():
            images = previews(self.pipe, self.models.values(), list(self.data.sample_prompts), c.seed, c.sample_steps,
                              self.resolution, self.step)
        if images and self.accelerator.is_main_process:
            save_grid(images, self.run_dir / "samples" / f"step-{self.step:06d}.png")
        if images and self.callbacks.on_sample:
            self.callbacks.on_sample(self.step, images)
        return images

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint the current state, if it is good: the loss of the next micro-step with it is finite."""
        self._settle()
        with torch.no_grad():  # a pure function of (seed, m): probing it changes nothing
            probe = self.micro_loss(self.step * self.config.grad_accum + len(self.window))
        if not torch.isfinite(probe):
            raise self._diverged(f"the loss became {probe.item()}")
        wait_for_everyone(self.accelerator)
        if self.accelerator.is_main_process:
            grads = {n: p.grad.detach().clone() for n, p in self.trainable.items() if p.grad is not None}
            state = {
                "step": self.step,
                "losses": self.losses,
                "window": self.window,
                "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "grads": grads if self.window else {},
            }
            save_run(self.run_dir, state, self.saved_step)
        self.saved_step = self.step
        if self.callbacks.on_checkpoint and self.accelerator.is_main_process:
            self.callbacks.on_checkpoint(self.step)

    def load(self) -> None:
        if self.accelerator.is_main_process:  # not another process's file in the middle of its write
            remove_stale_temporaries(self.run_dir)  # a run killed mid-write left its temporary file
        state = read_checkpoint(self.run_dir)
        restore(state, self.run_dir, self.method, self.optimizer, self.lr_scheduler, self.base_lrs, self.trainable)
        self.step, self.losses, self.window = state["step"], list(state["losses"]), list(state["window"])
        self.saved_step = self.step


def train_loop(
    method: Method,
    pipe: Any,
    data: TrainData,
    config: TrainConfig,
    run_dir: Path | str,
    *,
    callbacks: Callbacks | None = None,
    cancel: Cancel = None,
    resume: bool = False,
) -> LoopResult:
    """Train `method` on `pipe` with `data`; checkpoints, loss curve and previews go to `run_dir`."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return Loop(method, pipe, data, config, Path(run_dir), callbacks=callbacks, cancel=cancel, resume=resume).run()
