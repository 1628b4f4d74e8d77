"""The diffusion objective the loop minimises: the (prior-preserving) loss and Min-SNR weights.

Latent diffusion (Rombach et al., arXiv:2112.10752, Eq. 2) with DDPM's forward process (Ho et al., arXiv:2006.11239,
Eq. 4); the regression target (eps, v or z_0, as the scheduler config says) is `studio.schedulers.training_target`.
"""

from __future__ import annotations

from typing import Any

import torch


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, n_prior: int = 0, prior_weight: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE; the last `n_prior` samples are class images, adding prior_weight * their MSE (DreamBooth Eq. 2).

    `weights` (B,) scales each sample's squared error (Min-SNR-gamma); None is the plain mean.
    """
    pred, target = pred.float(), target.float()
    per = (pred - target).pow(2).flatten(1).mean(1)  # (B,)
    if weights is not None:
        per = per * weights
    if not n_prior:
        return per.mean()
    n = pred.shape[0] - n_prior
    return per[:n].mean() + prior_weight * per[n:].mean()


def min_snr_weights(scheduler: Any, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., arXiv:2303.09556, eq. 8-9), (B,) for timesteps t.

    The x0-loss weight min(SNR_t, gamma) expressed for what the UNet predicts: epsilon min(SNR, gamma) / SNR,
    v min(SNR, gamma) / (SNR + 1), x0 min(SNR, gamma). SNR_t = abar_t / (1 - abar_t).
    """
    abar = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped
