"""Full fine-tuning: every UNet weight trained (optionally the text encoder too), with an EMA of the UNet.

This is how the embedded base is trained (`studio world train-base`): latent diffusion's objective (Rombach et al.,
arXiv:2112.10752, eq. 2) on all UNet parameters, the exponential moving average of the weights (diffusers'
`EMAModel`, with its warm-up decay 1 - (1 + step)^-power) being what ships. The result is a model, not an adapter:
it is exported as a diffusers folder (`studio.world.base.export_base`), never to the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from studio.errors import StudioError
from studio.library.meta import AdapterMeta
from trainers.method import Method, MethodConfig


if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


_EMA = "ema."


@dataclass
class FullConfig(MethodConfig):
    method: ClassVar[str] = "full"

    lr: float = field(default=2e-4, metadata={"help": "learning rate of the UNet"})
    ema_decay: float = field(default=0.9995, metadata={"help": "largest EMA decay (reached after the warm-up)"})
    ema_power: float = field(default=0.75, metadata={"help": "EMA warm-up: decay = 1 - (1 + step)^-power"})
    train_text_encoder: bool = field(default=False, metadata={"help": "fine-tune the text encoder too"})
    text_lr_scale: float = field(default=0.1, metadata={"help": "text-encoder lr as a fraction of --lr"})


class Full(Method):
    config_cls = FullConfig
    config: FullConfig

    def attach(self, components: Any) -> None:
        from diffusers.training_utils import EMAModel

        self.unet = components.unet
        self.text_encoder = components.text_encoder if self.config.train_text_encoder else None
        self.unet.requires_grad_(True)
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(True)
        self.ema = EMAModel(
            self.unet.parameters(), decay=self.config.ema_decay, use_ema_warmup=True, power=self.config.ema_power
        )

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        out = {f"unet.{n}": p for n, p in self.unet.named_parameters()}
        if self.text_encoder is not None:
            out.update({f"text_encoder.{n}": p for n, p in self.text_encoder.named_parameters()})
        return out

    def trainable_parameters(self) -> list[dict[str, Any]]:
        groups = [{"params": list(self.unet.parameters()), "lr": self.config.lr}]
        if self.text_encoder is not None:
            lr = self.config.lr * self.config.text_lr_scale
            groups.append({"params": list(self.text_encoder.parameters()), "lr": lr})
        return groups

    def on_step_end(self, step: int) -> None:
        self.ema.step(self.unet.parameters())

    def ema_unet(self) -> UNet2DConditionModel:  # float32 on the CPU
        """A copy of the UNet holding the EMA weights (what ships)."""
        unet = self.unet.__class__.from_config(self.unet.config)
        self.ema.copy_to(unet.parameters())
        return unet.float().cpu().eval()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state.update({f"{_EMA}{i}": p.detach().clone() for i, p in enumerate(self.ema.shadow_params)})
        state[f"{_EMA}step"] = torch.tensor(self.ema.optimization_step)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in state.items() if not k.startswith(_EMA)}
        super().load_state_dict(own)
        with torch.no_grad():
            for i, p in enumerate(self.ema.shadow_params):
                p.copy_(state[f"{_EMA}{i}"])
        self.ema.optimization_step = int(state[f"{_EMA}step"])

    def delta_weights(self) -> dict[str, torch.Tensor]:
        raise StudioError("full fine-tuning makes a model, not an adapter; export it as a diffusers folder")

    def export(self) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
        raise StudioError("full fine-tuning makes a model, not an adapter; export it with `--export`")
