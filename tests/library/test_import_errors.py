"""Damaged adapter files found by `studio bench fuzz` are refused with one clear error and leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from studio.errors import StudioError
from studio.library import Library, import_adapter


STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
MODULE = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _kohya(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {f"{STEM}.lora_down.weight": torch.randn(4, 32, generator=g),
               f"{STEM}.lora_up.weight": torch.randn(32, 4, generator=g), f"{STEM}.alpha": torch.tensor(2.0)}
    for key, value in changes.items():
        tensors.pop(f"{STEM}.{key}") if value is None else tensors.__setitem__(f"{STEM}.{key}", value)
    return tensors


CASES = {
    "vector alpha": ({"alpha": torch.tensor([1.0, 2.0])}, "alpha must be one number"),
    "empty alpha": ({"alpha": torch.zeros(0)}, "alpha must be one number"),
    "NaN alpha": ({"alpha": torch.tensor(float("nan"))}, "alpha is nan"),
    "scalar up": ({"lora_up.weight": torch.tensor(1.0)}, "lora_B has shape \\[\\], not 2-D"),
    "1-D up": ({"lora_up.weight": torch.randn(32)}, "lora_B has shape \\[32\\], not 2-D"),
    "rank mismatch": ({"lora_up.weight": torch.randn(32, 5)}, "do not fit"),
    "NaN weight": ({"lora_down.weight": torch.full((4, 32), float("nan"))}, "NaN or infinite"),
    "int weight": ({"lora_down.weight": torch.ones(4, 32, dtype=torch.int8)}, "not a floating-point tensor"),
    "empty weight": ({"lora_down.weight": torch.zeros(0, 32), "lora_up.weight": torch.zeros(32, 0)}, "is empty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_kohya_files_are_refused(case: str, tmp_path: Path) -> None:
    changes, message = CASES[case]
    path = tmp_path / "a.safetensors"
    save_file(_kohya(**changes), str(path))
    with pytest.raises(StudioError, match=message):
        import_adapter(path, name="a")
    assert Library().list() == [] and not any(Library().root.glob(".staging-*"))


def _diffusers(tmp_path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    path = tmp_path / "d.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_damaged_diffusers_and_peft_files_are_refused(tmp_path: Path) -> None:
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    with pytest.raises(StudioError, match=f"module '{MODULE}' needs both lora_A.weight and lora_B.weight"):
        import_adapter(_diffusers(tmp_path, {f"{MODULE}.lora_A.weight": a}), name="d")
    with pytest.raises(StudioError, match="lora_adapter_metadata is not a JSON object"):
        import_adapter(_diffusers(tmp_path, {f"{MODULE}.lora_A.weight": a, f"{MODULE}.lora_B.weight": b},
                                  {"lora_adapter_metadata": "7"}), name="d")
    with pytest.raises(StudioError, match="alpha of .* must be a number"):
        import_adapter(_diffusers(tmp_path, {f"{MODULE}.lora_A.weight": a, f"{MODULE}.lora_B.weight": b},
                                  {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": "x"})}), name="d")
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({f"base_model.model.{MODULE[5:]}.lora_A.weight": a, f"base_model.model.{MODULE[5:]}.lora_B.weight": b},
              str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["to_q"]}
    for bad, message in (({"r": 10**12}, "the config says rank 1000000000000 but the tensors have rank 4"),
                         ({"r": "x"}, "rank of .* must be a number"), ({"rank_pattern": [1]}, "not a JSON object"),
                         ({"lora_alpha": None, "r": None}, "must be a number")):
        (folder / "adapter_config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(StudioError, match=message):
            import_adapter(folder, name="p")
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(StudioError, match="is not a JSON object"):
        import_adapter(folder, name="p")
    assert Library().list() == []
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert import_adapter(folder, name="p").meta.ranks == {MODULE: 4}  # the undamaged folder imports
