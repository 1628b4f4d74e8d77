"""The compiled Triton kernels on a CUDA device against the float64 reference (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from kernel_naive import adapters, rand

from lora_kernels import dispatch, reference


pytestmark = [pytest.mark.gpu, pytest.mark.triton]
CUDA = torch.device("cuda")


def _layer(seed: int, sizes: tuple[int, ...], d_in: int, ranks: list[int], bias: bool = False) -> tuple:
    g = torch.Generator().manual_seed(seed)
    weights = [rand(g, n, d_in) / d_in**0.5 for n in sizes]
    biases = [rand(g, n) if bias else None for n in sizes]
    factors = [[(a / d_in**0.5, b / 8) for a, b in adapters(g, n, d_in, ranks)] for n in sizes]
    return weights, biases, factors


def _to(tree: object, dtype: torch.dtype) -> object:
    if isinstance(tree, torch.Tensor):
        return tree.to(device=CUDA, dtype=dtype)
    if isinstance(tree, list | tuple):
        return type(tree)(_to(t, dtype) for t in tree)
    return tree


def _rel(got: tuple, want: tuple) -> float:
    got, want = (torch.cat([t.double().flatten() for t in v]) for v in (got, want))
    return float((got - want).norm() / want.norm())


CASES = {  # name: (projection sizes, d_in, tokens (B, N), ranks of the K adapters)
    "qkv-640-N4096": ((640, 640, 640), 640, (2, 4096), [16, 16, 16, 16]),
    "qkv-1280-N1024": ((1280, 1280, 1280), 1280, (2, 1024), [16, 16, 16, 16]),
    "kv-ctx2048-L77": ((640, 640), 2048, (2, 77), [16, 8, 32, 4]),
    "q-odd-shapes": ((200,), 136, (3, 333), [5, 11]),
}


def _case(name: str, dtype: torch.dtype, seed: int = 0) -> tuple[tuple, tuple]:
    sizes, d_in, lead, ranks = CASES[name]
    weights, biases, factors = _layer(seed, sizes, d_in, ranks, bias=name.startswith("q-"))
    g = torch.Generator().manual_seed(seed + 1)
    x, s = rand(g, *lead, d_in), torch.rand(*lead, len(ranks), generator=g, dtype=torch.float64)  # per-token S
    want = reference.fused_qkv(*_to((x, weights, biases, factors, s), torch.float64))
    got = dispatch.fused_qkv(*_to((x, weights, biases, factors), dtype), s.to(CUDA), backend="triton")
    ref = reference.fused_qkv(*_to((x, weights, biases, factors), dtype), s.to(CUDA))  # torch in the same dtype
    return got, want, ref


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_float64(name: str) -> None:
    got, want, _ = _case(name, torch.float32)
    assert all(t.dtype == torch.float32 for t in got)
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_16_bit_within_the_dtype_tolerance(name: str, dtype: torch.dtype) -> None:
    """fp32 accumulation: as close to float64 as torch's own matmuls in the same dtype (bf16 keeps 8 mantissa bits)."""
    got, want, ref = _case(name, dtype)
    err, torch_err = _rel(got, want), _rel(ref, want)
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3), (err, torch_err)
    assert err < 2 * torch_err + 1e-4, (err, torch_err)


def test_backward_matches_the_reference_autograd() -> None:
    sizes, d_in, ranks = (96, 96, 160), 128, [16, 8, 16]
    weights, biases, factors = _layer(3, sizes, d_in, ranks, bias=True)
    g = torch.Generator().manual_seed(4)
    x, s = rand(g, 2, 100, d_in), torch.rand(2, 100, 3, generator=g, dtype=torch.float64)
    grads = []
    for dtype, backend in ((torch.float64, "reference"), (torch.float32, "triton")):
        w, b, f = _to((weights, biases, factors), dtype)
        leaves = [_to(x, dtype), _to(s, dtype), w[0], b[2], f[0][1][0], f[2][2][1]]
        for t in leaves:
            t.requires_grad_(True)
        out = dispatch.fused_qkv(leaves[0], w, b, f, leaves[1], backend=backend)
        loss = sum((y * torch.sin(y)).sum() for y in out)
        grads.append(torch.autograd.grad(loss, leaves))
    for name, want, got in zip(["x", "s", "w_q", "b_v", "a_q1", "b_v2"], *grads):
        assert _rel((got,), (want,)) < 1e-5, name


def test_auto_picks_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x, w = torch.zeros(4, 8, device=CUDA, dtype=torch.bfloat16), torch.zeros(4, 8, device=CUDA, dtype=torch.bfloat16)
    assert dispatch.choose_backend(x, w, []) == "triton"
    assert dispatch.choose_backend(x, w.float(), []) == "reference"  # mixed dtypes fall back
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.choose_backend(x, w, []) == "reference"


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_processor_triton_equals_reference_in_bf16(cross: bool) -> None:
    attention_processor = pytest.importorskip("diffusers.models.attention_processor")
    torch.manual_seed(0)
    attn = attention_processor.Attention(query_dim=320, cross_attention_dim=768 if cross else None, heads=5,
                                         dim_head=64, out_bias=True).to(CUDA, torch.bfloat16)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    d_kv = 768 if cross else 320

    def triple(d_out: int, d_in: int, r: int) -> tuple:
        return (rand(g, r, d_in) / d_in**0.5, rand(g, d_out, r) / 8, 1.0)

    factors = dispatch.AdapterFactors(q=[triple(320, 320, 16) for _ in range(4)],
                                      k=[triple(320, d_kv, 16) for _ in range(4)],
                                      v=[triple(320, d_kv, 16) for _ in range(4)],
                                      out=[triple(320, 320, 16) for _ in range(4)])  # fmt: skip
    factors.q, factors.k, factors.v, factors.out = (
        _to(getattr(factors, p), torch.bfloat16) for p in ("q", "k", "v", "out")
    )
    x = rand(g, 2, 320, 32, 32).to(CUDA, torch.bfloat16)  # (B, C, H, W)
    context = rand(g, 2, 77, 768).to(CUDA, torch.bfloat16) if cross else None
    mask = torch.rand(2, 4, 8, 8, generator=g).to(CUDA)  # (B, K, h, w) soft regions
    outs = {}
    for backend in ("reference", "triton"):
        attn.set_processor(dispatch.FusedLoRAAttnProcessor(factors, dispatch.region_scales(mask), backend=backend))
        with torch.no_grad():
            outs[backend] = attn(x, encoder_hidden_states=context).float()
    assert _rel((outs["triton"],), (outs["reference"],)) < 2e-2


NORM_CASES = {  # name: ((B, C, H, W), groups, K normalisers): SD1.5 and SDXL UNet GroupNorms, odd sizes
    "sd-320-64x64": ((2, 320, 64, 64), 32, 3),
    "sdxl-2560-32x32": ((2, 2560, 32, 32), 32, 3),
    "odd-90-7x9": ((3, 90, 7, 9), 6, 5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(NORM_CASES))
def test_region_group_norm_matches_float64(name: str, dtype: torch.dtype) -> None:
    from lora_kernels.group_norm import region_group_norm, region_group_norm_reference

    shape, groups, k = NORM_CASES[name]
    g = torch.Generator().manual_seed(5)
    x, weight, bias = rand(g, *shape) * 2 + 0.5, rand(g, shape[1]), rand(g, shape[1])
    length = shape[2] * shape[3]
    average, share = torch.rand(length, k, generator=g).double(), torch.rand(k, length, generator=g).double()
    args = (x, groups, weight, bias, 1e-5, average / average.sum(0), share / share.sum(0))
    want = region_group_norm_reference(*_to(args, torch.float64))
    got = region_group_norm(*_to(args, dtype), backend="triton")
    ref = region_group_norm_reference(*_to(args, dtype))  # torch in the same dtype
    assert got.dtype == dtype and torch.equal(region_group_norm(*_to(args, dtype)), got)  # "auto" picks Triton
    err, torch_err = _rel((got,), (want,)), _rel((ref,), (want,))
    assert err < {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype], (err, torch_err)
    assert err < 2 * torch_err + 1e-5, (err, torch_err)
    leaf = _to(x, dtype).requires_grad_(True)  # a gradient asked: the reference, with its autograd graph
    assert region_group_norm(leaf, *_to(args[1:], dtype)).grad_fn is not None
