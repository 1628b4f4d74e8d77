"""lora_kernels.reference, the spec, against a per-adapter loop and merged weights, in float64 with random adapters."""

from __future__ import annotations

import pytest
import torch
from kernel_naive import adapters, merged, naive, rand

from lora_kernels import reference


D_IN, D_CTX = 24, 40
SIZES = {"q": 16, "k": 16, "v": 20}  # v wider than q and k: projections need not share a width
RANKS = [3, 0, 5]  # K = 3; adapter 1 has no factors on this projection


def _layer(seed: int, d_in: int = D_IN, bias: bool = True) -> tuple[list, list, list]:
    g = torch.Generator().manual_seed(seed)
    weights = [rand(g, SIZES[p], d_in) for p in "qkv"]
    biases = [rand(g, SIZES[p]) if bias and p != "k" else None for p in "qkv"]
    factors = [adapters(g, SIZES[p], d_in, RANKS if p != "v" else [2, 4, 1]) for p in "qkv"]
    return weights, biases, factors


@pytest.mark.parametrize("form", ["K", "BK", "BNK", "TK"])
def test_fused_qkv_matches_per_adapter_loop(form: str) -> None:
    weights, biases, factors = _layer(0)
    g = torch.Generator().manual_seed(1)
    x = rand(g, 2, 7, D_IN)  # (B, N, d_in)
    full = torch.rand(2, 7, 3, generator=g, dtype=torch.float64)  # (B, N, K)
    s, s_full = {
        "K": (full[0, 0], full[0, 0].expand(2, 7, 3)),
        "BK": (full[:, 0], full[:, :1].expand(2, 7, 3)),
        "BNK": (full, full),
        "TK": (full.reshape(14, 3), full),
    }[form]
    x_in = x.reshape(14, D_IN) if form == "TK" else x
    out = reference.fused_qkv(x_in, weights, biases, factors, s)
    for p, y in enumerate(out):
        want = naive(x, weights[p], biases[p], factors[p], s_full)  # (B, N, d_p)
        torch.testing.assert_close(y.reshape(want.shape), want, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(want, naive(x, weights[p], biases[p], [], s_full))  # the adapters do change y


def test_pack_layout() -> None:
    """A_cat rows, block-diagonal B_cat and per-rank-column scales follow the documented layout."""
    weights, biases, factors = _layer(2)
    packed = reference.pack(weights, biases, factors)
    assert packed.ranks == (3, 0, 5, 3, 0, 5, 2, 4, 1) and packed.sizes == (16, 16, 20) and packed.n_adapters == 3
    assert packed.rank_sizes == (8, 8, 7)
    assert packed.lora_a.shape == (23, D_IN) and packed.lora_b.shape == (52, 23)
    torch.testing.assert_close(packed.lora_a[8 + 3 : 8 + 8], factors[1][2][0])  # (k, adapter 2): rows 11..15
    torch.testing.assert_close(packed.lora_b[16:32, 11:16], factors[1][2][1])
    assert packed.lora_b[:16, 8:].abs().sum() == 0 and packed.lora_b[16:, :8].abs().sum() == 0  # block-diagonal
    assert packed.bias is not None and packed.bias[16:32].abs().sum() == 0  # k had no bias
    s = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # (T, K)
    assert reference.column_scales(s, [2, 0, 1]).tolist() == [[1.0, 1.0, 3.0], [4.0, 4.0, 6.0]]


def test_constant_scales_equal_merged_weights() -> None:
    weights, biases, factors = _layer(3)
    s = [0.7, -1.3, 0.25]
    x = rand(torch.Generator().manual_seed(4), 3, 5, D_IN)
    out = reference.fused_qkv(x, weights, biases, factors, torch.tensor(s, dtype=torch.float64))
    for p, y in enumerate(out):
        want = torch.nn.functional.linear(x, merged(weights[p], factors[p], s), biases[p])
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_per_sample_scales_equal_each_sample_merged() -> None:
    """Different adapters per sample in one batch: sample b equals its own merged weights."""
    weights, biases, factors = _layer(5)
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 2.0], [0.3, 0.3, 0.3]], dtype=torch.float64)  # (B, K)
    x = rand(torch.Generator().manual_seed(6), 3, 4, D_IN)
    out = reference.fused_qkv(x, weights, biases, factors, s)
    for b in range(3):
        for p, y in enumerate(out):
            want = torch.nn.functional.linear(x[b], merged(weights[p], factors[p], s[b].tolist()), biases[p])
            torch.testing.assert_close(y[b], want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[0][0], out[0][1])


def test_region_mask_applies_only_the_region_adapter() -> None:
    """S one-hot per token (a region mask): a token in region k gets base + adapter k and nothing else."""
    weights, biases, factors = _layer(7)
    factors = [[f if f is not None else adapters(torch.Generator().manual_seed(8), f_w.shape[0], D_IN, [2])[0]
                for f in fs] for fs, f_w in zip(factors, weights)]  # fmt: skip
    g = torch.Generator().manual_seed(9)
    region = torch.randint(0, 3, (2, 12), generator=g)  # (B, N) region of each token
    s = torch.nn.functional.one_hot(region, 3).double()  # (B, N, K)
    x = rand(g, 2, 12, D_IN)
    out = reference.fused_qkv(x, weights, biases, factors, s)
    for p, y in enumerate(out):
        for k in range(3):
            tokens = region == k  # (B, N)
            only_k = naive(x, weights[p], biases[p], [factors[p][k]], torch.ones(2, 12, 1, dtype=torch.float64))
            torch.testing.assert_close(y[tokens], only_k[tokens], rtol=1e-12, atol=1e-12)
            other = naive(
                x, weights[p], biases[p], [factors[p][(k + 1) % 3]], torch.ones(2, 12, 1, dtype=torch.float64)
            )
            assert not torch.allclose(y[tokens], other[tokens])


def test_cross_attention_is_q_alone_plus_kv_on_the_context() -> None:
    g = torch.Generator().manual_seed(10)
    weights, biases, factors = _layer(11, bias=False)
    w_kv, f_kv = [rand(g, SIZES[p], D_CTX) for p in "kv"], [adapters(g, SIZES[p], D_CTX, RANKS) for p in "kv"]
    x, context = rand(g, 2, 6, D_IN), rand(g, 2, 9, D_CTX)  # the context has its own width and length
    s = torch.rand(2, 3, generator=g, dtype=torch.float64)  # (B, K)
    (q,) = reference.fused_qkv(x, weights[:1], [None], factors[:1], s)
    k, v = reference.fused_qkv(context, w_kv, [None, None], f_kv, s)
    torch.testing.assert_close(q, naive(x, weights[0], None, factors[0], s[:, None].expand(2, 6, 3)))
    torch.testing.assert_close(v, naive(context, w_kv[1], None, f_kv[1], s[:, None].expand(2, 9, 3)))
    assert k.shape == (2, 9, 16)


def test_gradients_match_the_loop() -> None:
    """Differentiable in x, W, b, A, B and S, with the loop's gradients (the oracle of the Triton backward)."""
    weights, biases, factors = _layer(12)
    g = torch.Generator().manual_seed(13)
    x, s = rand(g, 2, 5, D_IN), torch.rand(2, 5, 3, generator=g, dtype=torch.float64)
    leaves = [x, s, weights[0], biases[0], *factors[0][0]]
    for t in leaves:
        t.requires_grad_(True)
    grads = []
    for fn in (
        lambda: reference.fused_qkv(x, weights, biases, factors, s)[0],
        lambda: naive(x, weights[0], biases[0], factors[0], s),
    ):
        y = fn()
        grads.append(torch.autograd.grad((y * torch.cos(y)).sum(), leaves))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bad_shapes_say_what_to_pass() -> None:
    weights, biases, factors = _layer(14)
    x = torch.zeros(2, 5, D_IN, dtype=torch.float64)
    with pytest.raises(ValueError, match="do not broadcast"):
        reference.fused_qkv(x, weights, biases, factors, torch.ones(3, 3))
    with pytest.raises(ValueError, match="adapter count 3"):
        reference.fused_qkv(x, weights, biases, factors, torch.ones(2))
    factors[1][0] = (factors[1][0][0], factors[1][0][1].T)
    with pytest.raises(ValueError, match="adapter 0 on projection 1"):
        reference.pack(weights, biases, factors)
    with pytest.raises(ValueError, match="use None"):
        reference.pack(weights, biases, [factors[0], factors[1][:2], factors[2]])


def test_the_cached_group_index_can_be_saved_for_backward_after_an_inference_call() -> None:
    """A regional composition's first UNet call runs in inference mode and its latent guidance differentiates later
    through the Triton projection, which saves the group index for backward: autograd refuses an inference tensor."""
    with torch.inference_mode():
        groups = reference.group_index((3, 9, 1), "cpu")
    assert not groups.is_inference()
    x = torch.randn(4, 13, requires_grad=True)
    (x.index_select(1, groups.long()) * groups).sum().backward()  # saves it for backward
    assert x.grad is not None
