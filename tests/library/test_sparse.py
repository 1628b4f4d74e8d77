"""Sparse-delta adapters (SaRA) in the library: load at a weight beside others, unload exactly, merge, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.errors import StudioError
from studio.library import AdapterMeta, Library, export_adapter, load_adapters, merge, resize, unload_adapters
from studio.library.compat import base_info
from studio.library.meta import modules_of
from studio.library.tools import param_deltas
from studio.models import load_pipeline


PARAMS = ["unet.conv_in.weight", "unet.down_blocks.0.resnets.0.norm1.bias",
          "text_encoder.encoder.layers.0.self_attn.q_proj.weight"]
LORA_MODULE = "unet.conv_in"  # the LoRA shares this module with the sparse deltas


def _tensor(pipe, param: str) -> torch.Tensor:  # noqa: ANN001
    component, rest = param.split(".", 1)
    return getattr(pipe, component).get_parameter(rest)


def _sparse(pipe, name: str, seed: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """A random sparse delta over PARAMS (a third of each parameter's entries, overlapping across seeds)."""
    g = torch.Generator().manual_seed(seed)
    tensors, shapes = {}, {}
    for param in PARAMS:
        shape = list(_tensor(pipe, param).shape)
        n = torch.Size(shape).numel()
        index = torch.randperm(n, generator=g)[: n // 3].sort().values
        tensors[f"{param}.indices"] = index.to(torch.int32)
        tensors[f"{param}.values"] = torch.randn(index.numel(), generator=g) * 0.05
        shapes[param] = shape
    meta = AdapterMeta(peft_type="SPARSE", sparse={"shapes": shapes}, method="sara", kind="subject")
    meta.base = base_info(pipe, modules_of(tensors))
    Library().add(name, tensors, meta)
    return tensors


def _lora(pipe, name: str) -> dict[str, torch.Tensor]:  # noqa: ANN001
    g = torch.Generator().manual_seed(7)
    conv = pipe.unet.conv_in
    tensors = {f"{LORA_MODULE}.lora_A.weight": torch.randn(2, conv.in_channels, 3, 3, generator=g) * 0.1,
               f"{LORA_MODULE}.lora_B.weight": torch.randn(conv.out_channels, 2, 1, 1, generator=g) * 0.1}
    meta = AdapterMeta(ranks={LORA_MODULE: 2}, alphas={LORA_MODULE: 4.0}, method="dreambooth_lora")
    meta.base = base_info(pipe, modules_of(tensors))
    Library().add(name, tensors, meta)
    return tensors


def _dense(tensors: dict[str, torch.Tensor], param: str, shape: torch.Size) -> torch.Tensor:
    out = torch.zeros(shape.numel())
    out[tensors[f"{param}.indices"].long()] = tensors[f"{param}.values"]
    return out.view(shape)


def test_sparse_adapters_stack_reweight_and_unload_bit_for_bit(tiny_dirs: dict[str, Path]) -> None:
    pipe = load_pipeline(tiny_dirs["sd1"])
    base = {p: _tensor(pipe, p).detach().clone() for p in PARAMS}
    a, b = _sparse(pipe, "sp-a", 0), _sparse(pipe, "sp-b", 1)
    _lora(pipe, "lo")
    load_adapters(pipe, ["sp-a", "lo", "sp-b"], [1.0, 1.0, 0.5])  # a PEFT wrapper on conv_in, sparse beneath it
    for p in PARAMS:
        expected = base[p] + _dense(a, p, base[p].shape) + 0.5 * _dense(b, p, base[p].shape)
        torch.testing.assert_close(_tensor(pipe, p.replace("conv_in.", "conv_in.base_layer.")
                                           if "conv_in" in p else p), expected)
    load_adapters(pipe, ["sp-a"], [-0.3])  # re-weighted, not reloaded
    unload_adapters(pipe, ["sp-b"])
    for p in PARAMS:
        torch.testing.assert_close(_tensor(pipe, p.replace("conv_in.", "conv_in.base_layer.")
                                           if "conv_in" in p else p), base[p] - 0.3 * _dense(a, p, base[p].shape))
    unload_adapters(pipe)
    assert all(torch.equal(_tensor(pipe, p), base[p]) for p in PARAMS)  # exactly the base again


def test_merge_is_the_exact_sum_and_exports_as_a_full_weight_diff(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    pipe = load_pipeline(tiny_dirs["sd1"])
    a, lora = _sparse(pipe, "sp-a", 0), _lora(pipe, "lo")
    merged = merge([("sp-a", 1.0), ("lo", -0.7)], "sum")
    assert merged.meta.peft_type == "SPARSE" and merged.meta.method == "merge"
    got = param_deltas(merged.meta, merged.state_dict())
    conv = "unet.conv_in.weight"
    lora_delta = (lora[f"{LORA_MODULE}.lora_B.weight"].flatten(1) @ lora[f"{LORA_MODULE}.lora_A.weight"].flatten(1)
                  * 2.0).view(got[conv].shape)  # alpha / r = 2
    torch.testing.assert_close(got[conv], _dense(a, conv, got[conv].shape) - 0.7 * lora_delta)
    other = "text_encoder.encoder.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[other], _dense(a, other, got[other].shape))

    fresh = load_pipeline(tiny_dirs["sd1"])
    base = _tensor(fresh, conv).detach().clone()
    load_adapters(fresh, ["sum"])
    torch.testing.assert_close(_tensor(fresh, conv), base + got[conv])

    diff = load_file(export_adapter("sum", "diff", tmp_path))
    assert set(diff) == set(got) and all(torch.equal(diff[k], got[k]) for k in got)
    lora_diff = load_file(export_adapter("lo", "diff", tmp_path / "lo.safetensors"))
    torch.testing.assert_close(lora_diff[conv], lora_delta)

    with pytest.raises(StudioError, match="--combination cat"):
        merge([("sp-a", 1.0), ("lo", 1.0)], "bad", combination="svd", rank=2)
    with pytest.raises(StudioError, match="--format diff"):
        export_adapter("sp-a", "kohya", tmp_path / "x.safetensors")
    with pytest.raises(StudioError, match="no rank to resize"):
        resize("sp-a", 2)


def test_damaged_sparse_deltas_are_refused(tiny_dirs: dict[str, Path]) -> None:
    pipe = load_pipeline(tiny_dirs["sd1"])
    good = _sparse(pipe, "sp-a", 0)
    meta = Library().get("sp-a").meta
    param = PARAMS[0]
    cases = {
        "strictly increasing": {f"{param}.indices": good[f"{param}.indices"].flip(0)},
        "outside its shape": {f"{param}.indices": good[f"{param}.indices"] + 10_000_000},
        "needs both": {f"{param}.values": None},
        "NaN": {f"{param}.values": torch.full_like(good[f"{param}.values"], float("nan"))},
    }
    for message, change in cases.items():
        tensors = {**good, **change}
        tensors = {k: v for k, v in tensors.items() if v is not None}
        with pytest.raises(StudioError, match=message):
            Library().add("bad", tensors, meta)
    assert "bad" not in Library()
    other = load_pipeline(tiny_dirs["sd1"])
    other.unet.conv_in = torch.nn.Conv2d(4, 8, 3)  # another architecture: a shape differs
    with pytest.raises(StudioError, match=r"unet.conv_in.weight has shape \[8, 4, 3, 3\]"):
        load_adapters(other, ["sp-a"])
    assert torch.equal(other.unet.down_blocks[0].resnets[0].norm1.bias, pipe.unet.down_blocks[0].resnets[0].norm1.bias)


def test_a_released_sparse_adapter_is_unloaded_and_the_lora_beside_it_kept_warm(tiny_dirs: dict[str, Path]) -> None:
    """Sparse deltas sit in the base weights, so they cannot wait outside the model as PEFT layers do."""
    import studio.library.load as load

    pipe = load_pipeline(tiny_dirs["sd1"])
    base = {p: _tensor(pipe, p).detach().clone() for p in PARAMS}
    _sparse(pipe, "sp-a", 0)
    _lora(pipe, "lo")
    load_adapters(pipe, ["sp-a", "lo"])
    load.release_adapters(pipe, ["sp-a", "lo"])
    assert list(load._WARM[pipe].adapters) == ["lo"] and load.loaded_adapters(pipe) == {}
    assert all(torch.equal(_tensor(pipe, p), base[p]) for p in PARAMS)  # conv_in is its base module again
