"""DreamBooth-LoRA: low-rank adapters on the UNet (attention, feed-forward, ResNet) and optionally the text encoders.

DreamBooth (Ruiz et al., arXiv:2208.12242; its prior-preservation loss, Eq. 2, is the loop's) trained through LoRA
(Hu et al., arXiv:2106.09685, Eq. 3: h = W0 x + (alpha / r) B A x), as diffusers'
`examples/dreambooth/train_dreambooth_lora.py` does it: PEFT `LoraConfig(init_lora_weights="gaussian")`, so
A ~ N(0, 1/r^2) and B = 0 and training starts exactly at the base; text encoder targets q_proj, k_proj, v_proj,
out_proj (both encoders on SDXL). Trained: every A and B. Frozen: everything else.

Defaults: tuned on the Shapes World bar (`studio bench adapters`), not the script's. Its attention-only rank-4 LoRA
at lr 1e-4 (diffusers' README) learns the emblem's outline but not its inner shape and dot: on the embedded base,
1000 steps at batch 4, judged at guidance 5, found the emblem in 50% of the bench prompts with rank 16 on attention +
feed-forward; adding the ResNet 3x3 convolutions (`conv1`, `conv2`: LoRA on convolutions, as kohya's LoCon does; a
rank-r 3x3 down conv and 1x1 up conv) took it to 95%. lr 1e-3 (the script's argparse default is 5e-4). Such an
adapter also turned prompts without its trigger into the emblem (the base's single-object accuracy 0.99 -> 0.72 on
24 of them): the loop's prior preservation on renders of random world scenes holds that (0.99 -> 0.95), and
text-encoder LoRA (on by default here) gives the trigger a meaning of its own, which took the hardest bench emblem
from 55% found to 75% (800 steps, 4 + 4 images a step); 1200 steps of 2 + 2: 100%, accuracy 0.98; 700 steps of
2 + 2 (the 5-minute budget on two CPU cores): 85-100%, accuracy within 3 points.
Fewer, larger steps (a GPU's launch-bound step costs about the same at a larger batch) lose part of the emblem
(`studio bench adapters --emblems 1 --no-texture --train-steps K --batch-size B --lr LR`, the bench's first emblem,
20 prompts, CPU): 700 steps of 2 + 2 at 1e-3 found it in 90%; 350 of 8 + 8 at 2e-3 80%, 350 of 4 + 4 at 2e-3 75%,
250 of 8 + 8 at 3e-3 70%, 175 of 8 + 8 at 2e-3 and 4e-3 60% and 75% (drift at most 3 points), so the defaults stay.
`--target-modules to_q,to_k,to_v,to_out.0 --rank 4 --lr 1e-4 --no-train-text-encoder` gives the script's README
recipe back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from studio.errors import StudioError
from studio.library.meta import AdapterMeta
from trainers.method import TEXT_ENCODERS, TEXT_TARGETS, UNET_TARGETS, Method, MethodConfig, split_targets


ADAPTER = "default"


@dataclass
class DreamBoothLoRAConfig(MethodConfig):
    method: ClassVar[str] = "dreambooth_lora"
    min_images: ClassVar[int] = 3  # DreamBooth: 3 to 5 images of the subject

    lr: float = field(default=1e-3, metadata={"help": "learning rate (diffusers' DreamBooth-LoRA README: 1e-4)"})
    rank: int = field(default=16, metadata={"help": "LoRA rank r (diffusers' scripts: 4)"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (scale alpha / r); default r"})
    target_modules: str = field(
        default=UNET_TARGETS, metadata={"help": "UNet layers to adapt, comma-separated name suffixes"}
    )
    train_text_encoder: bool = field(
        default=True, metadata={"help": "also train LoRA on the text encoder(s) (diffusers' scripts: off)"}
    )
    text_encoder_lr: float | None = field(default=None, metadata={"help": "text-encoder learning rate; default lr"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise StudioError(f"--rank must be at least 1, got {self.rank}")
        if not 0 <= self.lora_dropout < 1:
            raise StudioError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        split_targets(self.target_modules)


class DreamBoothLoRA(Method):
    config_cls = DreamBoothLoRAConfig
    graphable = True  # PEFT LoRA layers: the UNet's step can be recorded (`trainers.graphs`)
    config: DreamBoothLoRAConfig

    def attach(self, components: Any) -> None:
        c = self.config
        alpha = c.alpha if c.alpha is not None else c.rank
        self.models: dict[str, nn.Module] = {}
        plan = [("unet", c.target_modules)]
        if c.train_text_encoder:
            plan += [(name, TEXT_TARGETS) for name in TEXT_ENCODERS if getattr(components, name, None) is not None]
        for name, targets in plan:
            config = LoraConfig(
                r=c.rank,
                lora_alpha=alpha,
                init_lora_weights="gaussian",
                lora_dropout=c.lora_dropout,
                target_modules=split_targets(targets),
            )
            model = getattr(components, name)
            try:
                inject_adapter_in_model(config, model, adapter_name=ADAPTER)
            except ValueError as err:  # PEFT: no module matched
                raise StudioError(f"{name}: {err}; check --target-modules") from None
            self.models[name] = model

    def _layers(self) -> dict[str, LoraLayer]:
        return {
            f"{name}.{path}": m
            for name, model in self.models.items()
            for path, m in model.named_modules()
            if isinstance(m, LoraLayer) and ADAPTER in m.lora_A
        }

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        out = {}
        for module, layer in self._layers().items():
            out[f"{module}.lora_A.weight"] = layer.lora_A[ADAPTER].weight
            out[f"{module}.lora_B.weight"] = layer.lora_B[ADAPTER].weight
        return out

    def trainable_parameters(self) -> list[dict[str, Any]]:
        tensors = self.trainable_tensors()
        unet = [p for k, p in tensors.items() if k.startswith("unet.")]
        text = [p for k, p in tensors.items() if not k.startswith("unet.")]
        groups = [{"params": unet, "lr": self.config.lr}]
        if text:
            groups.append({"params": text, "lr": self.config.text_encoder_lr or self.config.lr})
        return groups

    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {m: layer.get_delta_weight(ADAPTER).detach().float() for m, layer in self._layers().items()}

    def export(self) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
        tensors = {k: p.detach().float().cpu().clone() for k, p in self.trainable_tensors().items()}
        layers = self._layers()
        ranks = {m: int(layer.r[ADAPTER]) for m, layer in layers.items()}
        alphas = {m: float(layer.lora_alpha[ADAPTER]) for m, layer in layers.items()}
        return tensors, self.meta(peft_type="LORA", ranks=ranks, alphas=alphas)
