"""The frozen base model's side of a run: its weights' precision, its modules' train/eval modes and gradient
checkpointing, and the VAE posteriors of the training images."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


@torch.no_grad()
def posterior(vae: nn.Module, images: torch.Tensor, device: torch.device, chunk_size: int = 8
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of q(z | x) for each image (N, 3, R, R), on the CPU in fp32: (N, C, R/f, R/f) each, f the VAE
    factor."""
    means, stds = [], []
    for chunk in images.split(chunk_size):
        dist = vae.encode(chunk.to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def cast_frozen(models: Mapping[str, nn.Module], trainable: Mapping[str, nn.Parameter]) -> None:
    """bf16 training keeps frozen weights in bf16 and trained tensors in fp32 (their optimizer needs them)."""
    keep = {id(p) for p in trainable.values()}
    for model in models.values():
        for p in model.parameters():
            if id(p) not in keep:
                p.data = p.data.to(torch.bfloat16)
    for p in trainable.values():
        p.data = p.data.float()


def set_training_modes(models: Mapping[str, nn.Module], text_trainable: bool, checkpointing: bool) -> None:
    """The UNet in train mode, text encoders in train mode when they are trained (dropout), and gradient
    checkpointing on the UNet and on the trained text encoders when `checkpointing`."""
    text_models = [m for name, m in models.items() if name.startswith("text_encoder")]
    models["unet"].train()
    for model in text_models:
        model.train(text_trainable)
    if not checkpointing:
        return
    models["unet"].enable_gradient_checkpointing()
    for model in text_models if text_trainable else []:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
