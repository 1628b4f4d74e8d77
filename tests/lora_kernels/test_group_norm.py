"""GroupNorm with statistics per region (lora_kernels.group_norm): the reference is GroupNorm with one uniform
normaliser and Eq. 1-3 written out otherwise; the dispatcher runs it on a CPU and says why Triton cannot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_kernels.group_norm import region_group_norm, region_group_norm_reference


def _stats(length: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normaliser weights (L, K), columns summing to 1, and shares (K, L), summing to 1 per position."""
    average = torch.rand(length, k, generator=g, dtype=torch.float64)
    share = torch.rand(k, length, generator=g, dtype=torch.float64)
    return average / average.sum(0), share / share.sum(0)


def _case(seed: int = 0, k: int = 3) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, 5, 7, generator=g, dtype=torch.float64) * 2 + 0.5  # (B, C, H, W), 4 groups of 3
    weight, bias = torch.randn(12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    return x, weight, bias, *_stats(35, k, g)


@pytest.mark.parametrize("affine", [True, False])
def test_one_uniform_normaliser_is_group_norm(affine: bool) -> None:
    x, weight, bias, _, _ = _case()
    weight, bias = (weight, bias) if affine else (None, None)
    average, share = torch.full((35, 1), 1 / 35, dtype=torch.float64), torch.ones(1, 35, dtype=torch.float64)
    got = region_group_norm_reference(x, 4, weight, bias, 1e-5, average, share)
    assert torch.allclose(got, F.group_norm(x, 4, weight, bias, 1e-5), atol=1e-12)


def test_the_reference_is_eq_1_to_3_written_out() -> None:
    x, weight, bias, average, share = _case(1)
    want = torch.zeros_like(x)
    for b in range(2):
        for group in range(4):
            block = x[b, 3 * group:3 * group + 3].flatten(1)  # (C / g, L)
            for k in range(3):
                mu = (block * average[:, k]).sum() / 3  # Eq. 1
                sigma = torch.sqrt((block**2 * average[:, k]).sum() / 3 - mu**2 + 1e-5)  # Eq. 2
                normed = share[k] * (block - mu) / sigma  # (C / g, L), Eq. 3 before the affine map
                want[b, 3 * group:3 * group + 3] += normed.reshape(3, 5, 7)
    want = want * weight[:, None, None] + bias[:, None, None]
    got = region_group_norm_reference(x, 4, weight, bias, 1e-5, average, share)
    assert torch.allclose(got, want, atol=1e-10)


def test_the_dispatcher_runs_the_reference_on_a_cpu_and_says_why_not_triton() -> None:
    x, weight, bias, average, share = (t.float() for t in _case(2))
    assert torch.equal(region_group_norm(x, 4, weight, bias, 1e-5, average, share),
                       region_group_norm_reference(x, 4, weight, bias, 1e-5, average, share))
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        region_group_norm(x, 4, weight, bias, 1e-5, average, share, backend="triton")
    with pytest.raises(ValueError, match=r"must be \(L, K\) and \(K, L\) with L = 35"):
        region_group_norm(x, 4, weight, bias, 1e-5, average[:30], share)
    with pytest.raises(ValueError, match="12 channels, which 5 groups do not divide"):
        region_group_norm(x, 5, weight, bias, 1e-5, average, share)
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        region_group_norm(x, 4, weight, bias, 1e-5, average, share, backend="cuda")
    x.requires_grad_(True)  # the reference keeps the autograd graph (latent guidance differentiates through it)
    region_group_norm(x, 4, weight, bias, 1e-5, average, share).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
