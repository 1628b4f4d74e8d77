"""CMLoRA's frequency profiling: how much an adapter changes the high-frequency content of what the model draws.

Zou et al., "Cached Multi-LoRA Composition for Multi-Concept Image Generation", ICLR 2025 (arXiv:2502.04923), §3:
some LoRAs amplify high-frequency content (edges, textures), others mainly drive low-frequency content (layout,
smooth colour). The paper's measure is ΔH_h, the change in high-frequency amplitude that the LoRA causes, with the
high band starting at h = 0.2 of the largest radius. As in the authors' analysis, an image is made grey, Fourier
transformed and centred; its log-magnitude is averaged over rings of equal radius, the ring profile is normalised by
its maximum, and H_h is the profile's mean over radii >= h * R_max. ΔH_h = H_h(image with the adapter) - H_h(the same
prompt and seed without it), averaged over seeds. Adapters with ΔH above a threshold form the high-frequency set
(the paper's H = character, clothing, style, object), the rest the low-frequency set (L = background).

The profile of an adapter does not depend on the composition it is used in (the paper profiles each LoRA once), so
it is kept per base model and adapter weights in the studio cache, keyed by a digest of the adapter's UNet tensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch


# (adapter name or None for the base alone, prompt, seed) -> image (3, H, W) in [0, 1]
Render = Callable[[str | None, str, int], torch.Tensor]


def radial_profile(image: torch.Tensor) -> torch.Tensor:
    """Mean log-magnitude of the centred 2-D spectrum of a grey `image` (H, W) per integer radius: (R + 1,)."""
    h, w = image.shape
    spectrum = torch.fft.fftshift(torch.fft.fft2(image.double()))  # (H, W), DC in the centre
    magnitude = torch.log1p(spectrum.abs())  # the log-magnitude spectrum
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    radius = torch.sqrt(yy.double() ** 2 + xx.double() ** 2).round().long()  # (H, W)
    sums = torch.zeros(int(radius.max()) + 1, dtype=torch.float64).index_add_(0, radius.flatten(), magnitude.flatten())
    counts = torch.bincount(radius.flatten(), minlength=sums.numel()).double()
    return sums / counts.clamp(min=1)


def high_frequency_amplitude(image: torch.Tensor, cutoff: float = 0.2) -> float:
    """H_h of an image (3, H, W) or (H, W): the max-normalised ring profile's mean over radii >= cutoff * R_max."""
    grey = image.double().mean(0) if image.dim() == 3 else image.double()  # (H, W)
    profile = radial_profile(grey)  # (R + 1,)
    profile = profile / profile.max().clamp(min=1e-12)
    start = int(round(cutoff * (profile.numel() - 1)))  # h = 0.2 of the largest radius (Zou et al. §3)
    return float(profile[start:].mean())


def frequency_shift(
    render: Render, prompts: dict[str, str], seeds: int = 2, cutoff: float = 0.2
) -> dict[str, float]:
    """ΔH_h of each adapter (`prompts`: name -> its prompt): H_h with the adapter minus H_h of the base alone on the
    same prompt and seed, averaged over seeds 0..seeds-1."""
    out = {}
    for name, prompt in prompts.items():
        deltas = [high_frequency_amplitude(render(name, prompt, s), cutoff)
                  - high_frequency_amplitude(render(None, prompt, s), cutoff) for s in range(seeds)]
        out[name] = sum(deltas) / len(deltas)
    return out


def frequency_order(shift: dict[str, float], threshold: float = 0.0) -> tuple[list[str], list[str]]:
    """(high-frequency set, low-frequency set), each by ΔH descending; the high set is never empty.

    The paper's sequencing integrates high-frequency adapters first (they dominate early denoising) and low-frequency
    ones later (Zou et al. §4.1).
    """
    ranked = sorted(shift, key=lambda n: (-shift[n], n))
    high = [n for n in ranked if shift[n] > threshold] or ranked[:1]
    return high, [n for n in ranked if n not in high]


def adapter_digest(unet: torch.nn.Module, name: str) -> str:
    """A digest of adapter `name`'s LoRA tensors in `unet` (identifies its weights whatever library it came from)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    digest = hashlib.sha1(name.encode())
    for module_name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                layer = getattr(module, attr)
                if name in layer:
                    digest.update(module_name.encode())
                    for p in layer[name].parameters() if isinstance(layer[name], torch.nn.Module) else [layer[name]]:
                        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def profile_prompt(name: str) -> str:
    """The prompt an adapter is profiled with: its trigger words from the library, else its name."""
    try:
        from studio.library import Library

        words = Library().get(name).meta.trigger_words
    except Exception:  # not in the default library (e.g. loaded from another one): the name stands in
        words = []
    return " ".join(words) or name


def pipeline_render(pipe: Any, weights: dict[str, float], steps: int) -> Render:
    """Render with one adapter active at its weight (in every component), or with none; memoised."""
    from composers.activation import activate
    from studio.generate import GenerateConfig, generate
    from studio.library.meta import COMPONENTS

    memo: dict[tuple[str | None, str, int], torch.Tensor] = {}

    def render(name: str | None, prompt: str, seed: int) -> torch.Tensor:
        if (name, prompt, seed) not in memo:
            for component in COMPONENTS:
                model = getattr(pipe, component, None)
                if model is not None and hasattr(model, "modules"):
                    activate(model, {name: weights[name]} if name else {})
            config = GenerateConfig(prompt=prompt, seed=seed, steps=steps)
            memo[name, prompt, seed] = generate(config, pipe=pipe, output_type="pt").images[0]  # (3, H, W)
        return memo[name, prompt, seed]

    return render


def profile_adapters(
    pipe: Any, weights: dict[str, float], *, steps: int = 10, seeds: int = 2, cutoff: float = 0.2
) -> dict[str, float]:
    """ΔH_h of each adapter of `weights` on `pipe`, from the studio cache when this base and adapter were profiled.

    Leaves every component with no adapter active; the caller re-activates what it needs.
    """
    from studio.atomic import write_json
    from studio.paths import cache_dir

    path = cache_dir() / "cmlora-frequency.json"
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        known = {}  # a damaged cache is rebuilt
    model = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", ""))
    keys = {n: f"{model}|{adapter_digest(pipe.unet, n)}|{w}|{steps}|{seeds}|{cutoff}|{profile_prompt(n)}"
            for n, w in weights.items()}
    todo = [n for n in weights if keys[n] not in known]
    if todo:
        render = pipeline_render(pipe, weights, steps)
        shift = frequency_shift(render, {n: profile_prompt(n) for n in todo}, seeds, cutoff)
        known.update({keys[n]: v for n, v in shift.items()})
        write_json(path, known)
    return {n: float(known[keys[n]]) for n in weights}
