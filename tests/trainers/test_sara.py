"""SaRA: only the below-threshold weights train, through sparse gradients; the sparse delta round-trips the library."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from trainer_helpers import quick

from studio.generate import GenerateConfig, generate
from studio.library import Library, delta_weight, load_adapters, unload_adapters
from studio.library.compat import CheckpointMismatchWarning
from studio.models import load_pipeline
from trainers import SaRA, SaRAConfig, train
from trainers.methods.sara import SparseParam, nuclear_norm


def _image(pipe) -> torch.Tensor:  # noqa: ANN001
    config = GenerateConfig(prompt="a large sks emblem on the left on a gray background", steps=2, size="32x32")
    return torch.from_numpy(generate(config, pipe=pipe, output_type="np").images)


def _sparse_linear(weight: torch.Tensor, threshold: float) -> tuple[nn.Linear, SparseParam]:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
    layer.weight.copy_(weight)
    index = (weight.abs() < threshold).view(-1).nonzero().view(-1)
    param = SparseParam(index, nn.Parameter(weight.view(-1)[index].clone()))
    parametrize.register_parametrization(layer, "weight", param)
    return layer, param


def test_sparse_gradients_are_the_dense_gradient_at_the_mask_and_the_rest_stays_frozen() -> None:
    torch.manual_seed(0)
    weight = torch.randn(12, 20) * 0.01
    layer, param = _sparse_linear(weight, 5e-3)
    assert 0 < param.index.numel() < weight.numel()
    with torch.no_grad():
        param.values.add_(torch.randn_like(param.values))  # non-identity: trained values differ from P0[M]
    x = torch.randn(7, 20)
    layer(x).square().sum().backward()

    dense = weight.clone()
    dense.view(-1)[param.index] = param.values.detach()
    dense.requires_grad_(True)
    (x @ dense.T).square().sum().backward()
    torch.testing.assert_close(param.values.grad, dense.grad.view(-1)[param.index])
    outside = torch.ones(weight.numel(), dtype=torch.bool)
    outside[param.index] = False
    assert torch.equal(layer.weight.detach().view(-1)[outside], weight.view(-1)[outside])  # bit-identical


def test_nuclear_norm_gradient_and_progressive_reselection() -> None:
    torch.manual_seed(1)
    method = SaRA(SaRAConfig(threshold=5e-3, lambda_rank=0.1, progressive_step=3))
    layer, param = _sparse_linear(torch.randn(24, 40) * 0.01, 5e-3)
    method.params, method.shapes, method.matrices = {"unet.a.weight": param}, {"unet.a.weight": [24, 40]}, [
        "unet.a.weight"]
    with torch.no_grad():
        param.values.add_(torch.randn_like(param.values) * 3e-3)
    method.regularizer(0).backward()
    masked = torch.zeros(24 * 40).index_put((param.index,), param.values.detach()).view(24, 40)
    u, _, vh = torch.linalg.svd(masked, full_matrices=False)
    torch.testing.assert_close(param.values.grad, 0.1 * (u @ vh).view(-1)[param.index])  # d||X||_* = U V^T, on M

    method.on_step_end(1)
    assert param.active is None  # not yet
    method.on_step_end(2)  # after progressive_step steps: entries grown past the threshold stop training
    grown = param.values.detach().abs() >= 5e-3
    assert grown.any() and (~grown).any() and torch.equal(param.active, ~grown)
    before = layer.weight.detach().clone()
    with torch.no_grad():
        param.values.add_(1.0)  # what Adam or weight decay might still do to a frozen entry
    after = layer.weight.detach()
    moved = (after != before).view(-1)[param.index]
    assert torch.equal(moved, ~grown)  # frozen entries hold their value; the others follow P_learn
    param.values.grad = None
    layer(torch.randn(3, 40)).sum().backward()
    assert torch.all(param.values.grad[grown] == 0) and param.values.grad[~grown].abs().sum() > 0
    restored = SaRA(method.config)
    restored.params = {"unet.a.weight": _sparse_linear(torch.randn(24, 40) * 0.01, 5e-3)[1]}
    restored.params["unet.a.weight"].values = nn.Parameter(torch.zeros_like(param.values))
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.params["unet.a.weight"].active, param.active)


@pytest.mark.parametrize(("shape", "empty_row"), [((20, 150), False), ((150, 20), False), ((20, 150), True)])
def test_the_nuclear_norm_through_qr_is_the_svds(shape: tuple[int, int], empty_row: bool) -> None:
    torch.manual_seed(2)
    matrix = torch.randn(shape) * (torch.rand(shape) < 0.2)  # sparse, like P (.) M
    if empty_row:
        matrix[3] = 0  # rank-deficient: QR's backward would divide by zero; the plain SVD is taken
    matrix.requires_grad_(True)
    (grad,) = torch.autograd.grad(nuclear_norm(matrix), matrix)
    u, s, vh = torch.linalg.svd(matrix.detach(), full_matrices=False)
    torch.testing.assert_close(nuclear_norm(matrix).detach(), s.sum())
    if empty_row:  # a subgradient: the plain SVD's own choice on the null direction
        (expected,) = torch.autograd.grad(torch.linalg.svdvals(matrix).sum(), matrix)
    else:
        expected = u @ vh  # d||M||_* = U V^T
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_sara_trains_small_weights_and_loads_exactly_at_a_weight(tiny_dirs: dict[str, Path]) -> None:
    model = str(tiny_dirs["sd1"])
    config = quick(name="sara-a", model=model, train_steps=3)
    result = train(SaRAConfig(lr=1e-2, progressive_step=2), config)
    entry = Library().get("sara-a")
    assert entry.meta.peft_type == "SPARSE" and entry.meta.method == "sara" and entry.meta.ranks == {}
    assert "SaRA" in entry.card and "sparse-delta" in entry.card
    state = entry.state_dict()
    fresh = load_pipeline(model)
    base = {f"unet.{k}": v.clone() for k, v in fresh.unet.state_dict().items()}
    shapes = entry.meta.sparse["shapes"]
    for key, tensor in state.items():
        param = key.rsplit(".", 1)[0]
        if key.endswith(".indices") and param in base:
            assert tensor.dtype == torch.int32 and list(base[param].shape) == shapes[param]
            selected = (base[param].abs() < 2e-3).view(-1).nonzero().view(-1)
            assert torch.equal(tensor.long(), selected)  # M = |P0| < theta, every entry of it
    assert any(v.abs().max() > 0 for k, v in state.items() if k.endswith(".values"))
    for module, dw in result.method.delta_weights().items():
        torch.testing.assert_close(delta_weight(entry.meta, state, module), dw.flatten(1))

    trained, plain = _image(result.pipe), _image(fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointMismatchWarning)
        load_adapters(fresh, ["sara-a"], [1.0])
    torch.testing.assert_close(_image(fresh), trained, rtol=1e-4, atol=1e-5)
    load_adapters(fresh, ["sara-a"], [0.5])
    conv = "unet.conv_in.weight"
    index, values = state[f"{conv}.indices"].long(), state[f"{conv}.values"]
    torch.testing.assert_close(fresh.unet.conv_in.weight.detach().view(-1)[index], base[conv].view(-1)[index]
                               + 0.5 * values)
    unload_adapters(fresh)
    assert all(torch.equal(v, base[f"unet.{k}"]) for k, v in fresh.unet.state_dict().items())  # bit for bit
    assert torch.equal(torch.from_numpy(_image(fresh).numpy()), plain)


@pytest.mark.parametrize("bad", ["threshold", "lambda_rank", "progressive_step"])
def test_sara_options_refuse_bad_values(bad: str) -> None:
    from studio.errors import StudioError

    with pytest.raises(StudioError, match=f"--{bad.replace('_', '-')} must be"):
        SaRAConfig(**{bad: -1})


def test_gradient_checkpointing_gives_the_same_sparse_gradients(tmp_path: Path) -> None:
    from trainer_helpers import emblem, tiny_pipe

    from trainers.loop import Loop

    grads = []
    for checkpointing in (False, True):
        method = SaRA(SaRAConfig(threshold=2e-2))  # the in-place write is redone by the recomputed forward
        loop = Loop(method, tiny_pipe(), emblem(), quick(gradient_checkpointing=checkpointing), tmp_path)
        loop.micro_loss(0).backward()
        grads.append({k: p.grad.clone() for k, p in method.trainable_tensors().items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k])


def test_a_run_stopped_after_the_reselection_resumes_to_the_same_delta(tiny_dirs: dict[str, Path]) -> None:
    """Cancelled at step 3 (after the progressive re-selection at step 2) and resumed: the sparse delta is the one
    of a run straight through, bit for bit (the re-selected mask and frozen values travel in the checkpoint)."""
    import dataclasses

    method = SaRAConfig(lr=1e-2, threshold=2e-2, progressive_step=2)
    straight = train(method, quick(name="sara-straight", model=str(tiny_dirs["sd1"]), train_steps=5))
    config = quick(name="sara-stopped", model=str(tiny_dirs["sd1"]), train_steps=5)
    calls = iter(range(100))
    stopped = train(method, config, cancel=lambda: next(calls) >= 3)
    assert stopped.status == "cancelled" and stopped.step == 3 and stopped.method.reselected()
    resumed = train(method, dataclasses.replace(config, resume="latest"))
    assert resumed.status == "done" and resumed.step == 5
    expected, got = straight.method.deltas(), resumed.method.deltas()
    assert expected.keys() == got.keys()
    assert any(d.abs().max() > 0 for _, d in expected.values())
    for key, (index, delta) in expected.items():
        assert torch.equal(got[key][0], index) and torch.equal(got[key][1], delta), key
