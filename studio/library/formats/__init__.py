"""Adapter formats in and out: kohya / A1111 LoRA, LyCORIS LoKr, diffusers LoRA, PEFT folders, studio folders.

`read_any(path, format="auto", pipe=None)` returns an `Imported` (name, canonical state dict, meta);
`write_any(entry, format, out)` writes one. Everything is safetensors; pickles are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.library.adapter import STUDIO_NAME, read_adapter, tensor_keys
from studio.library.formats.diffusers import WEIGHT_NAME, read_diffusers, write_diffusers
from studio.library.formats.kohya import read_kohya, write_kohya
from studio.library.formats.lycoris import read_lycoris, write_lycoris
from studio.library.formats.peft import read_peft, write_peft
from studio.library.formats.sd_scripts import Imported
from studio.library.meta import FORMATS, is_embedding, modules_of


_PICKLES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def detect(path: Path) -> str:
    """The format of a file or folder: native | peft | diffusers | kohya | lycoris."""
    path = Path(path)
    if not path.exists():
        raise StudioError(f"{path} does not exist")
    if path.is_dir():
        config = path / "adapter_config.json"
        if (path / STUDIO_NAME).is_file():
            return "native"
        if config.is_file():
            try:
                is_native = "studio" in json.loads(config.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise StudioError(f"{config} is damaged ({err})") from None
            return "native" if is_native else "peft"
        if any((path / c / "adapter_config.json").is_file() for c in ("unet", "text_encoder", "text_encoder_2")):
            return "peft"
        if (path / WEIGHT_NAME).is_file():
            return "diffusers"
        raise StudioError(f"{path} holds no adapter_config.json or {WEIGHT_NAME}; give the adapter file itself")
    if path.suffix.lower() in _PICKLES:
        raise StudioError(f"{path} is a pickle file; only .safetensors is accepted (convert it with safetensors)")
    if path.suffix.lower() != ".safetensors":
        raise StudioError(f"{path} is not a .safetensors file; only safetensors adapters are accepted")
    keys = tensor_keys(path)
    if keys and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "lycoris" if any(".lokr_" in k for k in keys) else "kohya"
    if keys and all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    sample = next(iter(keys), "(no tensors)")
    raise StudioError(f"{path} is not a LoRA/LoKr adapter file (first tensor {sample!r}); is it a full checkpoint?")


def read_any(path: Path, format: str = "auto", *, pipe: Any = None, layers_per_block: int | None = None) -> Imported:
    path = Path(path)
    fmt = detect(path) if format == "auto" else format
    if fmt == "native":
        state_dict, meta = read_adapter(path)
        return Imported(path.name, state_dict, meta)
    if fmt in ("kohya", "lycoris"):
        lokr = any(".lokr_" in k for k in tensor_keys(path))  # a LyCORIS file may be named either way
        reader = read_lycoris if lokr else read_kohya
        return reader(path, pipe=pipe, layers_per_block=layers_per_block)
    if fmt == "diffusers":
        return read_diffusers(path)
    if fmt == "peft":
        return read_peft(path)
    raise StudioError(f"unknown format {format!r}; use auto, {', '.join(FORMATS)}")


def write_any(name: str, state_dict: dict, meta: Any, format: str, out: Path) -> Path:
    writers = {"kohya": write_kohya, "diffusers": write_diffusers, "peft": write_peft, "lycoris": write_lycoris}
    if format not in writers:
        raise StudioError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    tables = [m for m in modules_of(state_dict) if is_embedding(m)]
    if tables and format != "peft":
        raise StudioError(f"{name!r} trains token-table rows ({tables[0]}), which {format} files cannot hold; export "
                          "it with --format peft, or --format diff (full-weight differences)")
    return writers[format](name, state_dict, meta, Path(out))


__all__ = ["FORMATS", "Imported", "detect", "read_any", "write_any"]
