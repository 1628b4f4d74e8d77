"""Backend choice on a CPU, region masks as per-token scales, and our package beside Hugging Face's `kernels`."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_naive import adapters, naive, rand

import lora_kernels
from lora_kernels import dispatch, reference


ROOT = Path(__file__).resolve().parents[2]


def _operands(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return rand(g, 4, 8, dtype=dtype), rand(g, 6, 8, dtype=dtype), rand(g, 2, 8, dtype=dtype)


def test_our_package_is_the_one_imported() -> None:
    assert os.path.dirname(lora_kernels.__file__) == str(ROOT / "lora_kernels")


def test_auto_falls_back_to_the_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, a = _operands()
    assert dispatch.choose_backend(x, w, [a]) == "reference"
    with pytest.raises(RuntimeError, match="CUDA device"):
        dispatch.choose_backend(x, w, [a], backend="triton")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.choose_backend(x, w, [a], backend="fast")


def test_env_var_forces_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, a = _operands()
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.choose_backend(x, w, [a]) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="cannot run"):
        dispatch.lora_linear(x, w, None, a, torch.zeros(6, 2), 1.0, [2])
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="STUDIO_KERNELS"):
        dispatch.choose_backend(x, w, [a])


def test_dispatched_ops_equal_the_loop() -> None:
    g = torch.Generator().manual_seed(1)
    x, s = rand(g, 2, 5, 8), torch.rand(2, 5, 2, generator=g, dtype=torch.float64)  # (B, N, d_in), (B, N, K)
    weights = [rand(g, 6, 8), rand(g, 4, 8)]
    factors = [adapters(g, 6, 8, [2, 3]), adapters(g, 4, 8, [1, 0])]
    out = dispatch.fused_qkv(x, weights, [None, None], factors, s, backend="auto")
    for p in range(2):
        torch.testing.assert_close(out[p], naive(x, weights[p], None, factors[p], s), rtol=1e-12, atol=1e-12)
    packed = reference.pack(weights[:1], [None], factors[:1])
    y = dispatch.lora_linear(x, packed.weight, None, packed.lora_a, packed.lora_b, s, packed.ranks)
    torch.testing.assert_close(y, out[0], rtol=1e-12, atol=1e-12)


def test_region_scales_follow_the_mask_at_each_layer_size() -> None:
    mask = torch.zeros(1, 2, 8, 16)  # (B, K, H, W): adapter 0 on the left half, adapter 1 on the right half
    mask[:, 0, :, :8] = 1
    mask[:, 1, :, 8:] = 1
    scales = dispatch.region_scales(mask)
    s = scales(1, 8)  # a 2x4 token grid
    assert s.shape == (1, 8, 2)
    assert s[0, :, 0].tolist() == [1, 1, 0, 0, 1, 1, 0, 0] and s[0, :, 1].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert scales(1, 128).shape == (1, 128, 2)
    with pytest.raises(ValueError, match="not a grid"):
        scales(1, 7)


def test_adapter_factors_need_one_entry_per_adapter() -> None:
    a, b = torch.zeros(2, 8), torch.zeros(6, 2)
    with pytest.raises(ValueError, match="differ in length"):
        dispatch.AdapterFactors(q=[(a, b, 1.0)], k=[(a, b, 1.0), None], v=[None])


@pytest.mark.skipif(
    not any(d.metadata["Name"] == "kernels" for d in importlib.metadata.distributions()),
    reason="Hugging Face's kernels distribution is not installed: nothing shares our name",
)
def test_transformers_still_imports_beside_hugging_face_kernels() -> None:
    """transformers 5 imports Hugging Face's top-level `kernels`; with the repo root first on sys.path (`./dev app`,
    `./dev test`) nothing of ours may shadow it, and ours must import beside it."""
    code = (
        "import kernels, lora_kernels, transformers.modeling_utils\n"
        "from kernels import CUDAProperties\n"
        f"assert not kernels.__file__.startswith({str(ROOT / 'kernels')!r}), kernels.__file__\n"
        "assert lora_kernels.reference.__name__ == 'lora_kernels.reference'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
