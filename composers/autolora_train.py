"""Training AutoLoRA's gates once per base (Li et al., arXiv:2508.02107, section 3.2; lzws `train_merger.py`).

The base and the adapters stay frozen; only the gates (`composers.autolora.GatedFusion`) learn. Each step draws two
distinct adapters, LoRA 1 and LoRA 2, and an image of LoRA 1's concept with its caption; both adapters (and the
Global LoRA of their sum) are gated at every layer, and

    loss = MSE(image_1 | prompt_1, dropped to "" with p = 0.3) + max(0, margin - MSE(image_1 | prompt_2))

the second term (a hinge) keeps LoRA 2's prompt from reproducing LoRA 1's image. The paper's objective is FLUX's
flow matching; here it is the base's own DDPM regression (`studio.schedulers.training_target`: v for studio-tiny, eps
for SD1.x). Paper: AdamW lr 1e-4, 8,000 steps; here a few hundred on the embedded base. Images: a Shapes World
adapter's own training data (`train_config.json`: emblem or texture, captions with its trigger, as the trainers write
them).

Measured on studio-tiny (compose bench, subject + style, 8 pairs, 2 CPU threads): gates trained 300 steps (254 s) on
the bench's gate set (`studio bench compose --autolora-gate-steps 300`: 2 emblem and 2 texture DreamBooth-LoRAs of
concepts no scored case uses), 16 seeds, one run each: composition success 0.273, against 0.320 with the untrained
gates and 0.203 for the uniform merge. So no gate ships for studio-tiny. (With the Global LoRA's randomized SVD, since
made exact, the same gate read 0.359 at 8 seeds and 0.312 / 0.258 at 16.) Gates trained on the composed target (the
world's render of the emblem in the texture, both adapters gated) read 0.25 at 8 seeds; the gates first measured,
trained against the noise although studio-tiny predicts v, 0.08.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from composers.activation import activate
from composers.autolora import GATE_DIR, AutoLoRAConfig, GatedFusion, build_fusion, install
from studio.errors import StudioError
from studio.library import Library, load_adapters, unload_adapters
from studio.schedulers import training_target


def concept_data(library: Library, name: str, n: int = 8) -> tuple[torch.Tensor, list[str]]:
    """`n` images (n, 3, 64, 64) in [0, 1] of a Shapes World adapter's concept and captions with its trigger."""
    from studio.world.datasets import emblem_dataset, texture_dataset

    entry = library.get(name)
    try:
        tc = json.loads((entry.folder / "train_config.json").read_text())
    except (OSError, ValueError):
        tc = {}
    trigger = (entry.meta.trigger_words or [name])[0]
    if tc.get("world_emblem") is not None:
        batch = emblem_dataset(int(tc["world_emblem"]), n)
        return batch.images, [c.replace("emblem", f"{trigger} emblem") for c in batch.captions]
    if tc.get("world_texture"):
        batch = texture_dataset(str(tc["world_texture"]), n)
        return batch.images, [f"{c} in {trigger} style" for c in batch.captions]
    raise StudioError(f"{name} was not trained on Shapes World: the gate trainer reads its concept's renders")


def train_gate(
    pipe: Any,
    names: list[str],
    *,
    steps: int = 200,
    lr: float = 1e-3,
    margin: float = 0.5,
    drop: float = 0.3,
    seed: int = 0,
    out: Path | None = None,
    library: Library | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the gates over `names` (at least 2 Shapes World adapters) on `pipe`'s base; saves them to `out`
    (default `assets/autolora-gate/<base>.safetensors`)."""
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    from studio.prompts import encode_prompt

    library = library or Library()
    if len(names) < 2:
        raise StudioError("the gate learns from pairs: give at least 2 adapters")
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)  # the base's native resolution
    data = {n: concept_data(library, n) for n in names}
    data = {n: (F.interpolate(x, size=(size, size), mode="bilinear", antialias=True) if x.shape[-1] != size else x, c)
            for n, (x, c) in data.items()}
    torch.manual_seed(seed)
    began = time.perf_counter()
    load_adapters(pipe, names, [1.0] * len(names), library=library)
    unet, vae = pipe.unet, pipe.vae
    config = AutoLoRAConfig()
    fusion: GatedFusion = build_fusion(pipe, names, config)[0]
    fusion.train()
    for p in fusion.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(fusion.parameters(), lr=lr, weight_decay=0.0)
    noise_sched = DDPMScheduler(**{k: v for k, v in pipe.scheduler.config.items() if k in (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "trained_betas")})
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    try:
        bar = tqdm(range(steps), desc="train AutoLoRA gate", disable=not progress)
        for _ in bar:
            i, j = torch.randperm(len(names), generator=g)[:2].tolist()
            first, second = names[i], names[j]
            images, captions = data[first]
            k = int(torch.randint(len(captions), (1,), generator=g))
            prompt1 = "" if float(torch.rand(1, generator=g)) < drop else captions[k]
            prompt2 = data[second][1][k % len(data[second][1])]
            with torch.no_grad():
                z0 = vae.encode(images[k : k + 1].to(vae.dtype) * 2 - 1).latent_dist.mode()  # (1, 4, 16, 16)
                z0 = z0 * vae.config.scaling_factor
                ctx = encode_prompt(pipe, [prompt1, prompt2], guidance=False).prompt_embeds  # (2, 77, D)
            noise = torch.randn(z0.shape, generator=g)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (1,), generator=g)
            zt = noise_sched.add_noise(z0, noise, t)
            activate(unet, {first: 1.0, second: 1.0})
            handle = install(unet, [first, second], fusion, config.global_rank)
            try:
                pred = unet(zt.repeat(2, 1, 1, 1), t.repeat(2), ctx).sample  # (2, 4, 16, 16)
            finally:
                handle.remove()
            target = training_target(noise_sched, z0, noise, t)[0]  # the base's own target: eps, v or z_0
            own = F.mse_loss(pred[0], target)
            other = F.mse_loss(pred[1], target)
            loss = own + F.relu(margin - other)  # section 3.2: reconstruction + hinge
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
    finally:
        unload_adapters(pipe, names)
    fusion.eval()
    base = Path(str(getattr(pipe, "name_or_path", "") or "base")).name or "base"
    out = Path(out) if out is not None else GATE_DIR / f"{base}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    fusion.save(out)
    summary = {"adapters": names, "steps": steps, "lr": lr, "margin": margin, "drop": drop, "seed": seed,
               "first_losses": losses[:10], "last_losses": losses[-10:],
               "seconds": round(time.perf_counter() - began, 1),
               "layers": len(fusion.gates), "parameters": sum(p.numel() for p in fusion.parameters())}
    from studio import atomic

    atomic.write_json(out.with_suffix(".json"), summary)
    return summary
