"""Seeded mutations of adapter files for `studio bench fuzz`: each returns a one-line description `kind: detail`.

Two levels, as a damaged download or a careless converter produces them:
- tensors (the container stays valid safetensors): a key dropped, added, renamed; a shape changed; a dtype changed;
  values NaN / infinite / huge; alphas broken; `__metadata__` values broken (lora_adapter_metadata JSON with wrong
  types and giant ranks included);
- bytes: the file truncated; the header length, header JSON or data flipped; giant declared shapes and offsets;
  empty or garbage files.
A PEFT folder mutates its `adapter_config.json` (missing keys, wrong types, giant or zero ranks, unknown types, broken
JSON, the file missing) or one of its weight files as above.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save


DTYPES = (torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool)
EXTRA_SUFFIXES = (".lora_mid.weight", ".dora_scale", ".hada_w1_a", ".weight", ".bias", ".lokr_w3", ".alpha",
                  ".lora_A.weight", ".lora_down.weight", ".lokr_w1", ".diff")
GIANT = (2**31, 2**40, 10**12, 2**63 - 1)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _pick(rng: random.Random, tensors: dict[str, torch.Tensor], suffix: str = "") -> str:
    keys = sorted(k for k in tensors if k.endswith(suffix)) or sorted(tensors)
    return rng.choice(keys)


def _reshaped(rng: random.Random, t: torch.Tensor) -> tuple[torch.Tensor, str]:
    shape = list(t.shape)
    choice = rng.randrange(6)
    if choice == 0 and shape:
        shape.pop(rng.randrange(len(shape)))
    elif choice == 1:
        shape.insert(rng.randrange(len(shape) + 1), rng.choice((1, 2, 3)))
    elif choice == 2 and shape:
        i = rng.randrange(len(shape))
        shape[i] = max(0, shape[i] + rng.choice((-1, 1, shape[i])))
    elif choice == 3:
        shape = []
    elif choice == 4 and len(shape) >= 2:
        shape = shape[::-1]
    else:
        shape = [0] * max(len(shape), 1)
    return torch.randn(shape), f"{list(t.shape)} -> {shape}"


def _tensor_mutation(rng: random.Random, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    kind = rng.choice(("drop", "extra", "rename", "shape", "dtype", "values", "alpha", "metadata", "swap"))
    key = _pick(rng, tensors)
    if kind == "drop":
        for _ in range(rng.choice((1, 1, 2, 5))):
            if tensors:
                tensors.pop(_pick(rng, tensors), None)
        return f"drop: {key} and maybe more"
    if kind == "extra":
        stem = key.rsplit(".", 2 if key.endswith(".weight") else 1)[0]
        new = (stem if rng.random() < 0.6 else stem.replace("0", "9", 1) + "_x") + rng.choice(EXTRA_SUFFIXES)
        tensors[new] = torch.randn(rng.choice(((4,), (4, 4), (2, 3, 1, 1), ())))
        return f"extra: {new}"
    if kind == "rename":
        parts = key.split("_" if key.startswith("lora_") else ".")
        i = rng.randrange(len(parts))
        parts[i] = rng.choice(("99", "x", "", parts[i] + "z", "attn9"))
        new = ("_" if key.startswith("lora_") else ".").join(parts)
        tensors[new] = tensors.pop(key)
        return f"rename: {key} -> {new}"
    if kind == "shape":
        tensors[key], what = _reshaped(rng, tensors[key])
        return f"shape: {key} {what}"
    if kind == "dtype":
        dtype = rng.choice(DTYPES)
        tensors[key] = (tensors[key] * 10).to(dtype)
        return f"dtype: {key} -> {dtype}"
    if kind == "values":
        t = tensors[key].clone().float()
        if t.numel():
            t.view(-1)[rng.randrange(t.numel())] = rng.choice((float("nan"), float("inf"), -float("inf"), 1e38))
        tensors[key] = t
        return f"values: {key}"
    if kind == "alpha":
        alphas = sorted(k for k in tensors if k.endswith(".alpha"))
        if not alphas or rng.random() < 0.2:
            stem = key.rsplit(".", 2 if key.endswith(".weight") else 1)[0]
            alphas = [stem + ".alpha"]
        target = rng.choice(alphas)
        tensors[target] = rng.choice((torch.tensor([1.0, 2.0]), torch.tensor(float("nan")), torch.tensor(-4.0),
                                      torch.tensor(0.0), torch.tensor(7, dtype=torch.int32), torch.tensor(1e30),
                                      torch.zeros(0), torch.tensor(float("inf"))))
        return f"alpha: {target} -> {tensors[target].tolist() if tensors[target].numel() < 3 else 'vector'}"
    if kind == "metadata":
        field = rng.choice(sorted(meta) or ["format"])
        packed = {"unet.r": rng.choice(GIANT + (0, -1)), "unet.lora_alpha": "x", "unet.rank_pattern": [1],
                  "unet.alpha_pattern": {"to_q": "nan"}, "text_encoder.r": None}
        meta[field] = rng.choice(("", "{", "nan", "1e309", json.dumps(dict(rng.sample(sorted(packed.items()), 2))),
                                  str(rng.choice(GIANT))))
        if rng.random() < 0.5:
            meta["lora_adapter_metadata"] = json.dumps(dict(rng.sample(sorted(packed.items()), 3)))
        return f"metadata: {field}"
    other = _pick(rng, tensors)
    tensors[key], tensors[other] = tensors[other], tensors[key]
    return f"swap: {key} <-> {other}"


def _byte_mutation(rng: random.Random, data: bytearray) -> tuple[bytes, str]:
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    kind = rng.choice(("truncate", "length", "flip-header", "giant", "dtype-name", "offsets", "flip-data", "garbage"))
    if kind == "truncate":
        cut = rng.randrange(len(data))
        return bytes(data[:cut]), f"truncate: at {cut} of {len(data)}"
    if kind == "length":
        value = rng.choice((0, 1, header_len - 1, header_len + 7, len(data), 2**40, 2**64 - 1))
        return struct.pack("<Q", value) + bytes(data[8:]), f"length: header length {header_len} -> {value}"
    if kind == "flip-header":
        for _ in range(rng.choice((1, 3, 10))):
            i = 8 + rng.randrange(header_len)
            data[i] = rng.randrange(256)
        return bytes(data), "flip-header: random header bytes"
    if kind == "flip-data" and len(data) > 8 + header_len:
        for _ in range(rng.choice((1, 16, 256))):
            data[8 + header_len + rng.randrange(len(data) - 8 - header_len)] = rng.randrange(256)
        return bytes(data), "flip-data: random tensor bytes"
    if kind == "garbage":
        size = rng.choice((0, 7, 8, 64, 4096))
        return bytes(rng.randrange(256) for _ in range(size)), f"garbage: {size} random bytes"
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[name]
    if kind == "giant":
        entry["shape"] = [rng.choice(GIANT) for _ in entry["shape"] or [0]]
        what = f"giant: {name} shape {entry['shape']}"
    elif kind == "dtype-name":
        entry["dtype"] = rng.choice(("F64", "I8", "BOOL", "F8_E4M3", "XYZ", "", 7))
        what = f"dtype-name: {name} {entry['dtype']}"
    else:
        entry["data_offsets"] = rng.choice(([0, rng.choice(GIANT)], [-1, 4], [5, 2], [0], "x"))
        what = f"offsets: {name} {entry['data_offsets']}"
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + bytes(data[8 + header_len :]), what


def mutate_safetensors(source: Path, target: Path, rng: random.Random) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    if rng.random() < 0.6:
        tensors, meta = _load(source)
        what = _tensor_mutation(rng, tensors, meta)
        if rng.random() < 0.2:
            what += " + " + _tensor_mutation(rng, tensors, meta)
        target.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta or None))
        return what
    blob, what = _byte_mutation(rng, bytearray(source.read_bytes()))
    target.write_bytes(blob)
    return what


def _config_mutation(rng: random.Random, config: dict[str, Any]) -> tuple[Any, str]:
    kind = rng.choice(("missing", "type", "giant", "peft-type", "patterns", "broken"))
    if kind == "missing":
        key = rng.choice(("r", "lora_alpha", "alpha", "target_modules", "peft_type", "rank_pattern", "alpha_pattern"))
        config.pop(key, None)
        return config, f"config-missing: {key}"
    if kind == "type":
        key = rng.choice(("r", "lora_alpha", "alpha", "target_modules", "rank_pattern", "decompose_factor"))
        config[key] = rng.choice(("x", 2.5, -1, 0, None, [1, 2], {"a": 1}, float("nan"), True))
        return config, f"config-type: {key}={config[key]!r}"
    if kind == "giant":
        key = rng.choice(("r", "lora_alpha", "decompose_factor"))
        config[key] = rng.choice(GIANT)
        return config, f"config-giant: {key}={config[key]}"
    if kind == "peft-type":
        config["peft_type"] = rng.choice(("LOHA", "IA3", "lora", 5, ""))
        return config, f"config-peft-type: {config['peft_type']!r}"
    if kind == "patterns":
        modules = config.get("target_modules") or ["to_q"]
        module = rng.choice(sorted(modules) if isinstance(modules, list) else ["to_q"])
        config["rank_pattern"] = {module: rng.choice((0, 1, 3, 2**40, "r"))}
        return config, f"config-patterns: rank_pattern {config['rank_pattern']}"
    return rng.choice(("", "{", "[1, 2]", "null", '{"r": 4')), "config-broken: not a JSON object"


def mutate(source: Path, target: Path, fmt: str, rng: random.Random) -> str:
    """Write a mutated copy of `source` (a file, or a PEFT folder) at `target`; returns what was changed."""
    if not source.is_dir():
        return mutate_safetensors(source, target, rng)
    shutil.copytree(source, target)
    component = rng.choice(sorted(p.name for p in target.iterdir() if p.is_dir()))
    folder = target / component
    roll = rng.random()
    if roll < 0.45:
        config = json.loads((folder / "adapter_config.json").read_text())
        mutated, what = _config_mutation(rng, config)
        text = mutated if isinstance(mutated, str) else json.dumps(mutated)
        (folder / "adapter_config.json").write_text(text)
        return f"{what.split(':')[0]}: {component} {what.split(':', 1)[1].strip()}"
    if roll < 0.5:
        missing = rng.choice(("adapter_config.json", "adapter_model.safetensors"))
        (folder / missing).unlink()
        return f"missing-file: {component}/{missing}"
    weights = folder / "adapter_model.safetensors"
    tmp = folder / "mutant.safetensors"
    what = mutate_safetensors(weights, tmp, rng)
    tmp.replace(weights)
    return f"{what.split(':')[0]}: {component} {what.split(':', 1)[1].strip() if ':' in what else ''}"
