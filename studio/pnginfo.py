"""Generation parameters stored in PNG text chunks, A1111-compatible.

`parameters` holds the A1111 text (prompt, `Negative prompt: ...`, then `Key: value, ...`), which A1111, ComfyUI
and civitai read; `studio` holds the same facts as JSON, so the studio reads its own files back exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from studio.atomic import atomic_path
from studio.errors import StudioError


def a1111_text(params: dict[str, Any]) -> str:
    """Format `params` (the keys of `GenerateConfig` plus extras) as A1111's `parameters` text."""
    from studio.schedulers import SCHEDULERS

    lines = [params.get("prompt", "")]
    if params.get("negative"):
        lines.append(f"Negative prompt: {params['negative']}")
    sampler = params.get("scheduler")
    fields = {
        "Steps": params.get("steps"),
        "Sampler": SCHEDULERS[sampler][2] if sampler in SCHEDULERS else sampler,
        "CFG scale": params.get("guidance"),
        "Seed": params.get("seed"),
        "Size": params.get("size"),
        "Model": params.get("model"),
        "Clip skip": params.get("clip_skip"),
        "Lora weights": ", ".join(f"{a['name']}: {a['weight']}" for a in params.get("adapters") or []) or None,
        "Composer": params.get("composer"),  # ours: how several adapters were composed (merge, switch, ...)
        "Rank": params.get("rank"),
        "Version": params.get("version"),
    }
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if any(c in text for c in ',:"'):
            text = json.dumps(text)
        parts.append(f"{key}: {text}")
    lines.append(", ".join(parts))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict[str, Any]:
    """Parse A1111 `parameters` text into {"prompt", "negative", <Key>: value, ...}."""
    lines = text.strip().split("\n")
    result: dict[str, Any] = {}
    last = lines[-1] if len(lines) > 1 or "Steps:" in lines[-1] else ""
    body = lines[:-1] if last else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result["prompt"] = "\n".join(prompt_lines).strip()
    result["negative"] = "\n".join(negative_lines).strip()
    for key, value in _FIELD.findall(last):
        value = value.strip()
        if value.startswith('"'):
            value = json.loads(value)
        result[key.strip()] = value
    return result


def save_png(image: Image.Image, path: str | Path, params: dict[str, Any]) -> Path:
    """Write `image` to `path` atomically with the `parameters` and `studio` text chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_text(params))
    info.add_text("studio", json.dumps(params, sort_keys=True))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters of a PNG: the studio's JSON when present, else A1111's text, parsed."""
    try:
        with Image.open(path) as image:
            chunks = dict(image.text) if hasattr(image, "text") else dict(image.info)
    except FileNotFoundError as err:
        raise StudioError(f"{path} does not exist") from err
    except OSError as err:
        raise StudioError(f"{path} is not a readable image ({err}); pass a PNG written by the studio") from err
    if "studio" in chunks:
        try:
            return json.loads(chunks["studio"])
        except ValueError:
            pass
    if "parameters" in chunks:
        return parse_a1111(chunks["parameters"])
    raise StudioError(f"{path} carries no generation parameters (no 'parameters' text chunk)")
