"""Run the Triton kernels in triton's CPU interpreter against the float64 reference; prints one JSON line of errors.

Its own process (test_kernel_interpret.py starts it): TRITON_INTERPRET must be set before triton is imported, and
it must not leak into other tests. Each entry is a relative Frobenius error (or a string when the case raised).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


os.environ["TRITON_INTERPRET"] = "1"
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


# Triton before 3.8 turns a scalar kernel argument into a Python int with int(array) on a 1-element array (a loop
# `range(0, D, BLOCK)` does it), which numpy 2.x refuses; 3.8 squeezes first. Do the same here, for the harness only.
_patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)
if _patch_lang_tensor is not None:

    def _squeezing_patch(tensor: type, scope: object) -> None:
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = _squeezing_patch
from kernel_naive import adapters, rand  # noqa: E402

from lora_kernels import dispatch, group_norm, reference, triton_group_norm, triton_lora  # noqa: E402


def rel(got: torch.Tensor | tuple, want: torch.Tensor | tuple) -> float:
    got, want = (torch.cat([t.flatten() for t in v]) if isinstance(v, tuple) else v for v in (got, want))
    return float((got.double() - want.double()).norm() / want.double().norm())


def layer(seed: int, sizes: tuple[int, ...], d_in: int, ranks: list[int], bias: bool = True) -> tuple:
    g = torch.Generator().manual_seed(seed)
    weights = [rand(g, n, d_in) / d_in**0.5 for n in sizes]
    biases = [rand(g, n) if bias and p != 1 else None for p, n in enumerate(sizes)]
    factors = [adapters(g, n, d_in, ranks if p != 1 else ranks[::-1]) for p, n in enumerate(sizes)]
    return weights, biases, factors


def cast(tree: object, dtype: torch.dtype) -> object:
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype)
    if isinstance(tree, list | tuple):
        return type(tree)(cast(t, dtype) for t in tree)
    return tree


def packed_case(seed: int, sizes: tuple[int, ...], ranks: list[int], lead: tuple[int, ...], form: str, dtype) -> float:
    """triton_lora.fused_qkv in `dtype` against reference.fused_qkv in float64."""
    weights, biases, factors = layer(seed, sizes, 40, ranks)
    g = torch.Generator().manual_seed(seed + 100)
    x = rand(g, *lead, 40)
    k = len(ranks)
    s = {"token": torch.rand(*lead, k, generator=g), "sample": torch.rand(lead[0], k, generator=g)}[form]
    want = reference.fused_qkv(x, weights, biases, factors, s.double())
    got = triton_lora.fused_qkv(*cast((x, weights, biases, factors), dtype), s)
    assert all(t.dtype == dtype for t in got)
    return rel(got, want)


def single_case() -> float:
    """lora_linear with a dense B over several 16-wide rank blocks and output tiles, no bias, (T, K) scales."""
    g = torch.Generator().manual_seed(7)
    x, w, a, b = rand(g, 50, 40), rand(g, 70, 40), rand(g, 45, 40), rand(g, 70, 45)
    s, ranks = torch.rand(50, 3, generator=g, dtype=torch.float64), [20, 9, 16]
    want = reference.lora_linear(x, w, None, a, b, s, ranks)
    return rel(triton_lora.lora_linear(*cast((x, w, None, a, b), torch.float32), s, ranks), want)


def norm_case(seed: int, shape: tuple[int, ...], groups: int, k: int, dtype, affine: bool = True,
              channels_last: bool = False) -> float:
    """triton_group_norm.region_group_norm in `dtype` against group_norm's reference in float64."""
    g = torch.Generator().manual_seed(seed)
    x = rand(g, *shape) * 2 + 0.5  # (B, C, H, W), off-centre like a feature map
    weight, bias = (rand(g, shape[1]), rand(g, shape[1])) if affine else (None, None)
    length = shape[2] * shape[3]
    average, share = torch.rand(length, k, generator=g).double(), torch.rand(k, length, generator=g).double()
    average, share = average / average.sum(0), share / share.sum(0)
    want = group_norm.region_group_norm_reference(x, groups, weight, bias, 1e-5, average, share)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    got = triton_group_norm.region_group_norm(*cast((x, groups, weight, bias, 1e-5, average, share), dtype))
    assert got.dtype == dtype and got.shape == want.shape
    return rel(got, want)


def backward_case() -> dict[str, float]:
    """Gradients of the Triton autograd.Function against the reference's autograd, fp32 against float64."""
    weights, biases, factors = layer(11, (24, 20, 28), 40, [4, 5, 3])
    g = torch.Generator().manual_seed(12)
    x, s = rand(g, 2, 9, 40), torch.rand(2, 9, 3, generator=g, dtype=torch.float64)
    names = ["x", "s", "w_q", "b_q", "a_q0", "b_q0", "b_v2"]
    grads = []
    for dtype, fn in ((torch.float64, reference.fused_qkv), (torch.float32, triton_lora.fused_qkv)):
        leaves = cast([x, s, weights[0], biases[0], *factors[0][0], factors[2][2][1]], dtype)
        for t in leaves:
            t.requires_grad_(True)
        w, b, f = list(weights), list(biases), [list(fs) for fs in factors]
        w[0], b[0], f[0][0], f[2][2] = leaves[2], leaves[3], (leaves[4], leaves[5]), (f[2][2][0], leaves[6])
        out = fn(leaves[0], *cast((w, b, f), dtype), leaves[1])
        loss = sum((y * torch.cos(y.double()).to(dtype)).sum() for y in out)
        grads.append(torch.autograd.grad(loss, leaves))
    return {f"grad_{n}": rel(got, want) for n, want, got in zip(names, *grads)}


def grad_after_inference_case() -> float:
    """A call in inference mode first (a sampling step caches the group index), then one with a gradient asked (a
    guided step): its backward against the reference's autograd."""
    weights, biases, factors = layer(13, (24, 20, 28), 40, [6, 7, 2])  # ranks no other case uses: a fresh cache
    g = torch.Generator().manual_seed(14)
    x, s = rand(g, 2, 9, 40), torch.rand(2, 9, 3, generator=g, dtype=torch.float64)
    w, b, f = cast((weights, biases, factors), torch.float32)
    with torch.inference_mode():
        triton_lora.fused_qkv(x.float(), w, b, f, s)
    grads = []
    for fn, dtype in ((reference.fused_qkv, torch.float64), (triton_lora.fused_qkv, torch.float32)):
        leaf = x.to(dtype).requires_grad_(True)
        out = fn(leaf, *cast((weights, biases, factors), dtype), s)
        grads.append(torch.autograd.grad(sum((y * y).sum() for y in out), leaf)[0])
    return rel(grads[1], grads[0])


def main() -> None:
    cases = {
        "fp32_qkv_token": lambda: packed_case(0, (24, 20, 28), [4, 0, 8], (37,), "token", torch.float32),
        "fp32_kv_sample": lambda: packed_case(1, (16, 40), [3, 16, 2], (2, 13), "sample", torch.float32),
        "fp32_four_projections": lambda: packed_case(2, (8, 8, 8, 8), [2, 3], (2, 5), "token", torch.float32),
        "fp32_no_adapter_factors": lambda: packed_case(3, (24, 20, 28), [0, 0], (2, 7), "token", torch.float32),
        "fp16_qkv_token": lambda: packed_case(4, (24, 20, 28), [4, 5, 8], (2, 11), "token", torch.float16),
        "bf16_qkv_token": lambda: packed_case(5, (24, 20, 28), [4, 5, 8], (2, 11), "token", torch.bfloat16),
        "fp32_lora_linear_dense": single_case,
        "grad_x_after_an_inference_call": grad_after_inference_case,
        "fp32_norm_three_regions": lambda: norm_case(20, (2, 12, 5, 7), 4, 3, torch.float32),
        "fp16_norm_two_regions": lambda: norm_case(21, (1, 64, 16, 16), 32, 2, torch.float16),
        "bf16_norm_no_affine": lambda: norm_case(22, (2, 30, 3, 3), 3, 1, torch.bfloat16, affine=False),
        "fp32_norm_wide_groups_channels_last": lambda: norm_case(23, (2, 160, 8, 8), 2, 5, torch.float32,
                                                                 channels_last=True),
    }
    errors: dict[str, float | str] = {}
    for name, case in cases.items():
        try:
            errors[name] = case()
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    try:
        errors.update(backward_case())
    except Exception as exc:
        errors["backward"] = f"{type(exc).__name__}: {exc}"
    x, w = torch.zeros(2, 8), torch.zeros(4, 8)
    errors["auto_backend_on_cpu"] = dispatch.choose_backend(x, w, [], backend="auto")
    errors["norm_auto_backend_on_cpu"] = group_norm._why_not_triton(x, []) or "triton"
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
