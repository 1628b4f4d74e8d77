"""Rows of `python -m lora_kernels.bench` for GroupNorm with statistics per region (`lora_kernels.group_norm`).

Per shape (a UNet GroupNorm's input, 32 groups, K = 3 normalisers: two boxes and the rest, as in a regional
composition of two concepts):
  group_norm  torch's GroupNorm (F.group_norm): the floor
  region      lora_kernels.group_norm.region_group_norm (Triton on CUDA, else the reference)
  reference   the reference in plain torch (16 operator calls)
Timed like the projection rows (`lora_kernels.bench.timer`), and the region path's error against float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lora_kernels.group_norm import region_group_norm, region_group_norm_reference


SHAPES = [("studio-tiny", (2, 64, 16, 16)), ("sd1.5 down", (2, 320, 64, 64)), ("sd1.5 mid", (2, 1280, 8, 8)),
          ("sdxl up", (2, 2560, 32, 32))]  # fmt: skip
GROUPS, NORMALISERS = 32, 3
PATHS = ("group_norm", "region", "reference")


def _case(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> tuple:
    """x, weight, bias, average (L, K), share (K, L) in float64 on `device`: two boxes (left, right thirds) and
    the rest, as composers.region_norm.box_statistics makes them."""
    g = torch.Generator().manual_seed(0)
    b, c, h, w = shape
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5
    weight, bias = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g).double()
    inside = torch.zeros(2, h, w, dtype=torch.float64)
    inside[0, :, : w // 3], inside[1, :, w - w // 3 :] = 1, 1  # (2, h, w)
    flat = inside.flatten(1)  # (2, L)
    keep = torch.cat([1 - flat.flip(0) * (1 - flat), torch.ones_like(flat[:1])])  # (3, L): without the other box
    share = torch.cat([flat, (flat.sum(0) == 0).double()[None]])  # (3, L)
    average = (keep / keep.sum(1, keepdim=True)).T.contiguous()  # (L, 3)
    return tuple(t.to(device) for t in (x, weight, bias, average, share))


def norm_rows(device: torch.device, dtype: torch.dtype, measure: Callable[[dict], dict], quick: bool = False) -> list:
    """One row per shape: `measure(paths)` (`lora_kernels.bench.time_paths`: ms per timer and the ratio to GroupNorm)
    and the region path's error."""
    rows = []
    for label, shape in SHAPES[:2] if quick else SHAPES:
        x64, w64, b64, average, share = _case(shape, device, dtype)
        x, weight, bias = x64.to(dtype), w64.to(dtype), b64.to(dtype)
        avg, sh = average.to(dtype), share.to(dtype)
        fns: dict[str, Callable[[], Any]] = {
            "group_norm": lambda: F.group_norm(x, GROUPS, weight, bias, 1e-5),
            "region": lambda: region_group_norm(x, GROUPS, weight, bias, 1e-5, avg, sh),
            "reference": lambda: region_group_norm_reference(x, GROUPS, weight, bias, 1e-5, avg, sh),
        }
        row: dict[str, Any] = {"shape": f"{label} {tuple(shape)}"}
        with torch.no_grad():
            row.update(measure(fns))
            try:
                want = region_group_norm_reference(x64, GROUPS, w64, b64, 1e-5, average, share)
                row["region_vs_float64"] = float((fns["region"]().double() - want).norm() / want.norm())
            except Exception as exc:
                row["region_vs_float64_error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    return rows


def norm_markdown(rows: list[dict], titles: dict[str, str]) -> list[str]:
    """The region GroupNorm tables, one per timer, as markdown lines."""
    lines = []
    for unit, title in titles.items():
        if not any(f"group_norm_{unit}" in row for row in rows):
            continue
        lines += ["", f"GroupNorm with statistics per region ({GROUPS} groups, K={NORMALISERS}), ms per call "
                  f"(ratio to GroupNorm), {title}:", "", "| shape | " + " | ".join(PATHS) + " | region vs float64 |",
                  "|---" * (len(PATHS) + 2) + "|"]  # fmt: skip
        for row in rows:
            cells = []
            for name in PATHS:
                ratio = f" ({row[f'{name}_{unit}_x']:.2f}x)" if f"{name}_{unit}_x" in row else ""
                cells.append(f"{row[f'{name}_{unit}']:.3f}{ratio}" if f"{name}_{unit}" in row else "error")
            error = f"{row['region_vs_float64']:.2e}" if "region_vs_float64" in row else "error"
            lines.append(f"| {row['shape']} | " + " | ".join(cells) + f" | {error} |")
    return lines
