"""The factor layout PEFT's LoKr layer builds (peft/tuners/lokr/layer.py `update_layer`), checked against a file's.

PEFT does not read a LoKr layout from the tensors: it rebuilds it from the base layer's dims, `r`, `decompose_both`
and `decompose_factor`, then copies the tensors in. Factors (a, c) and (b, d) with out = a * b, in = c * d load only
when `factorization(a * b, f) == (a, b)`, `factorization(c * d, f) == (c, d)`, w1 is full exactly when
`not (decompose_both and r < max(a, c) / 2)` and w2 exactly when `not (r < max(b, d) / 2)`. An adapter that breaks
one of these would fail inside PEFT at load time, so importers refuse it up front with this check.
"""

from __future__ import annotations

import torch
from peft.tuners.lokr.layer import factorization


def factor_dims(p: dict[str, torch.Tensor]) -> tuple[int, int, int, int, int | None, int | None]:
    """(a, c, b, d_or_None, r1, r2): w1 is (a, c), w2 is (b, d[, k...]); d is None for flat decomposed convs."""
    a, c = p["lokr_w1"].shape if "lokr_w1" in p else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
    r1 = None if "lokr_w1" in p else int(p["lokr_w1_b"].shape[0])
    if "lokr_w2" in p:
        b, d, r2 = p["lokr_w2"].shape[0], p["lokr_w2"].shape[1], None
    elif "lokr_t2" in p:
        b, d, r2 = p["lokr_w2_a"].shape[1], p["lokr_w2_b"].shape[1], int(p["lokr_t2"].shape[0])
    else:
        b, r2 = p["lokr_w2_a"].shape[0], int(p["lokr_w2_b"].shape[0])
        d = None  # (r, d * kh * kw): the kernel size is unknown without the base, so d is not checked
    return int(a), int(c), int(b), (int(d) if d is not None else None), r1, r2


def layout_problem(p: dict[str, torch.Tensor], r: int, decompose_both: bool, factor: int) -> str | None:
    """Why PEFT would not rebuild factors `p` (keys `lokr_w1`, ...) with these settings, or None when it would."""
    a, c, b, d, r1, r2 = factor_dims(p)
    if factorization(a * b, factor) != (a, b) or (d is not None and factorization(c * d, factor) != (c, d)):
        return f"factors ({a}, {c}) x ({b}, {d}) do not follow decompose_factor {factor}"
    use_w1 = not (decompose_both and r < max(a, c) / 2)
    use_w2 = not (r < max(b, d or 0) / 2) if d is not None else r2 is None
    if use_w1 != (r1 is None) or use_w2 != (r2 is None):
        return (f"w1 full={r1 is None}, w2 full={r2 is None} is not the layout PEFT builds for r={r}, "
                f"decompose_both={decompose_both}")
    return None
