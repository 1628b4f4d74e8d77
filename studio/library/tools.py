"""Adapter tools: import / export through the library, merge, resize by SVD, and metadata edits.

Merge combinations follow PEFT's `add_weighted_adapter` (peft/tuners/lora/model.py): `cat` concatenates the ranks
(exactly the weighted sum of deltas), `linear` sums A and B separately with sqrt(weight * scale) (same ranks only; not
the sum of deltas, as in PEFT), `svd` truncates the weighted sum of deltas to `rank`. LoKr inputs merge by `svd`.
Orthogonal-adaptation adapters merge by `cat` (their plain sum) only when their basis columns are disjoint
(studio/library/orthogonal.py); the result is again an orthogonal adapter holding the union of their columns.
A merge that holds a sparse delta (SaRA) is the exact weighted sum of every source's full-shape delta, stored as a
sparse delta (`cat`, the default; a LoRA's delta is dense, so its modules are stored whole). Any adapter exports as
`--format diff`: one safetensors of full-weight differences.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from studio import atomic
from studio.configs import finite
from studio.errors import DiskFull, StudioError
from studio.library import sparse
from studio.library.formats import read_any, write_any
from studio.library.meta import KINDS, AdapterMeta, is_embedding, modules_of
from studio.library.orthogonal import METHOD as ORTHOGONAL
from studio.library.orthogonal import check_disjoint, check_rows
from studio.library.store import Entry, Library, check_name, slugify


def import_adapter(
    path: Path | str,
    *,
    name: str | None = None,
    format: str = "auto",
    pipe: Any = None,
    library: Library | None = None,
    **fields: Any,
) -> Entry:
    """Import a file or folder into the library; `pipe` (optional) checks it and records the base."""
    library = library or Library()
    imported = read_any(Path(path), format, pipe=pipe)
    meta = imported.meta
    for key, value in fields.items():
        if value is not None:
            setattr(meta, key, value)
    if pipe is not None:
        from studio.library.compat import align_names, base_info, check_compatible

        imported.state_dict, meta = align_names(pipe, imported.state_dict, meta)
        check_compatible(pipe, name or imported.name, meta, imported.state_dict)
        meta.base = base_info(pipe, modules_of(imported.state_dict), name=meta.base.name)
    target = check_name(name) if name else slugify(imported.name)
    return library.add(target, imported.state_dict, meta)


def export_adapter(name: str, format: str, out: Path | str, *, library: Library | None = None) -> Path:
    entry = (library or Library()).get(name)
    if entry.meta.peft_type == sparse.PEFT_TYPE and format != "diff":
        raise StudioError(f"{name!r} is a sparse delta (SaRA), which {format} files cannot hold; export it with "
                          "--format diff (full-weight differences)")
    try:
        if format == "diff":
            state_dict = entry.state_dict()
            return sparse.write_diff(name, param_deltas(entry.meta, state_dict), entry.meta, Path(out))
        return write_any(name, entry.state_dict(), entry.meta, format, Path(out))
    except DiskFull:  # every export file is written atomically (a PEFT folder is staged): `out` is as it was
        raise atomic.disk_full(out, f"{name!r} was not exported to {out}, which is unchanged") from None


def delta_weight(meta: AdapterMeta, state_dict: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """dW of one module in float32 at scale alpha / r; conv deltas are flattened to (out, in * k * k)."""
    if meta.peft_type == sparse.PEFT_TYPE:
        index, values = sparse.by_param(state_dict)[f"{module}.weight"]
        return sparse.to_dense(index, values, meta.sparse["shapes"][f"{module}.weight"]).flatten(1)
    r, alpha = meta.ranks[module], meta.alphas[module]
    if meta.peft_type == "LORA":
        a = state_dict[f"{module}.lora_A.weight"].float().flatten(1)  # (r, in * k * k)
        b = state_dict[f"{module}.lora_B.weight"].float().flatten(1)  # (out, r)
        return b @ a * (alpha / r)
    from peft.tuners.lokr.layer import make_kron, make_weight_cp

    g = {k.rsplit(".", 1)[1]: v.float() for k, v in state_dict.items() if k.rsplit(".", 1)[0] == module}
    w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
    if "lokr_w2" in g:
        w2 = g["lokr_w2"]
    elif "lokr_t2" in g:
        w2 = make_weight_cp(g["lokr_t2"], g["lokr_w2_a"], g["lokr_w2_b"])
    else:
        w2 = g["lokr_w2_a"] @ g["lokr_w2_b"]
    return make_kron(w1, w2, alpha / r).flatten(1)


def param_deltas(meta: AdapterMeta, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<component>.<module>.<weight|bias>` -> the full-shape float32 change of that base tensor (LoRA and LoKr at
    scale alpha / r: their weights only)."""
    if meta.peft_type == sparse.PEFT_TYPE:
        shapes = meta.sparse.get("shapes", {})
        return {p: sparse.to_dense(i, v, shapes[p]) for p, (i, v) in sparse.by_param(state_dict).items()}
    out = {}
    for module in modules_of(state_dict):
        delta = delta_weight(meta, state_dict, module)  # (out, in * kh * kw)
        kernel = _kernel(meta, state_dict, module)
        if is_embedding(module):  # (dim, vocab): the table's own shape is (vocab, dim)
            delta = delta.T
        out[f"{module}.weight"] = delta.reshape(delta.shape[0], -1, *kernel) if kernel else delta
    return out


def _merge_sparse(entries: list[Entry], tensors: list[dict[str, torch.Tensor]], weights: list[float]) -> tuple[
        dict[str, torch.Tensor], dict[str, list[int]]]:
    """The exact weighted sum of the sources' full-shape deltas, as a sparse delta (and its shapes)."""
    total: dict[str, torch.Tensor] = {}
    for entry, state_dict, weight in zip(entries, tensors, weights):
        for param, delta in param_deltas(entry.meta, state_dict).items():
            if param in total and total[param].shape != delta.shape:
                raise StudioError(f"{param} has shape {list(total[param].shape)} in one adapter and "
                                  f"{list(delta.shape)} in {entry.name!r}; merge adapters of one base")
            total[param] = total[param] + weight * delta if param in total else weight * delta
    return sparse.from_dense(total)


def _kernel(meta: AdapterMeta, state_dict: dict[str, torch.Tensor], module: str) -> tuple[int, ...]:
    if meta.peft_type == "LORA":
        return tuple(state_dict[f"{module}.lora_A.weight"].shape[2:])
    for key in ("lokr_w2", "lokr_t2"):
        if f"{module}.{key}" in state_dict and state_dict[f"{module}.{key}"].dim() == 4:
            return tuple(state_dict[f"{module}.{key}"].shape[2:])
    return ()


def svd_factors(
    delta: torch.Tensor, rank: int, kernel: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of a flattened delta: B (out, r[, 1, 1]) and A (r, in[, kh, kw]), scale 1."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (out, k), (k,), (k, in * kh * kw)
    rank = min(rank, s.numel())
    b = (u[:, :rank] * s[:rank]).to(dtype)  # (out, r)
    a = vh[:rank].to(dtype)  # (r, in * kh * kw)
    if kernel:
        a = a.reshape(rank, -1, *kernel)  # (r, in, kh, kw)
        b = b.reshape(*b.shape, 1, 1)  # (out, r, 1, 1)
    return a.contiguous(), b.contiguous()


def _lora_from_deltas(
    deltas: dict[str, torch.Tensor], kernels: dict[str, tuple[int, ...]], rank: int, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    state_dict, ranks = {}, {}
    for module, delta in deltas.items():
        a, b = svd_factors(delta, rank, kernels[module], dtype)
        state_dict[f"{module}.lora_A.weight"], state_dict[f"{module}.lora_B.weight"] = a, b
        ranks[module] = a.shape[0]
    return state_dict, ranks


def merge(
    sources: list[tuple[str, float]],
    name: str,
    *,
    combination: str = "cat",
    rank: int | None = None,
    library: Library | None = None,
    overwrite: bool = False,
) -> Entry:
    """Merge weighted adapters into a new entry `name` (see the module docstring for the combinations)."""
    library = library or Library()
    check_name(name)
    if len(sources) < 1:
        raise StudioError("merge needs at least one NAME:WEIGHT")
    entries = [library.get(n) for n, _ in sources]
    weights = [float(finite(w, f"the weight of {n!r}")) for n, w in sources]
    fingerprints = {e.meta.base.fingerprint for e in entries if e.meta.base.fingerprint}
    families = {e.meta.base.family for e in entries if e.meta.base.family != "unknown"}
    if len(families) > 1:
        raise StudioError(f"cannot merge adapters for different bases ({', '.join(sorted(families))})")
    columns = None
    if len(entries) > 1 and all(e.meta.method == ORTHOGONAL for e in entries) and combination == "cat":
        columns = check_disjoint([(e.name, e.meta.method_config) for e in entries])  # the sum is interference-free
    tensors = [e.state_dict() for e in entries]
    if columns is not None:
        check_rows([(e.name, sd) for e, sd in zip(entries, tensors)])
    if any(e.meta.peft_type == sparse.PEFT_TYPE for e in entries):
        if combination != "cat":
            raise StudioError("a sparse (SaRA) adapter merges only by the exact sum of deltas: use --combination cat")
        state_dict, shapes = _merge_sparse(entries, tensors, weights)
        if not state_dict:
            raise StudioError("the weighted sum of these adapters is zero everywhere; nothing to save")
        first = entries[0].meta
        meta = AdapterMeta(
            peft_type=sparse.PEFT_TYPE,
            sparse={"shapes": shapes},
            method="merge",
            method_config={"sources": [n for n, _ in sources], "weights": weights, "combination": combination},
            kind=first.kind if len({e.meta.kind for e in entries}) == 1 else "unknown",
            trigger_words=list(dict.fromkeys(t for e in entries for t in e.meta.trigger_words)),
            tags=list(dict.fromkeys(t for e in entries for t in e.meta.tags)),
            base=copy.deepcopy(first.base) if len(fingerprints) <= 1 else type(first.base)(family=first.base.family),
        )
        return library.add(name, state_dict, meta, overwrite=overwrite)
    lokr = any(e.meta.peft_type != "LORA" for e in entries)
    if lokr and combination != "svd":
        raise StudioError("LoKr adapters merge only with --combination svd (choose a --rank)")
    dtype = next(iter(tensors[0].values())).dtype
    modules = list(dict.fromkeys(m for sd in tensors for m in modules_of(sd)))
    state_dict: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    if combination == "cat":
        for m in modules:
            parts = [(e, sd, w) for e, sd, w in zip(entries, tensors, weights) if f"{m}.lora_A.weight" in sd]
            a = torch.cat([sd[f"{m}.lora_A.weight"] for _, sd, _ in parts], 0)  # (sum r, in[, k, k])
            b = torch.cat(
                [sd[f"{m}.lora_B.weight"].float() * (w * e.meta.alphas[m] / e.meta.ranks[m]) for e, sd, w in parts], 1
            ).to(dtype)
            state_dict[f"{m}.lora_A.weight"], state_dict[f"{m}.lora_B.weight"] = a, b
            ranks[m] = a.shape[0]
    elif combination == "linear":
        for m in modules:
            parts = [(e, sd, w) for e, sd, w in zip(entries, tensors, weights) if f"{m}.lora_A.weight" in sd]
            if len({sd[f"{m}.lora_A.weight"].shape for _, sd, _ in parts}) != 1:
                raise StudioError(f"--combination linear needs equal ranks; module {m} differs (use cat or svd)")
            coef = [math.sqrt(abs(w * e.meta.alphas[m] / e.meta.ranks[m])) for e, _, w in parts]
            sign = [1.0 if w >= 0 else -1.0 for _, _, w in parts]
            a = sum(c * sd[f"{m}.lora_A.weight"].float() for c, (_, sd, _) in zip(coef, parts))
            b = sum(s * c * sd[f"{m}.lora_B.weight"].float() for s, c, (_, sd, _) in zip(sign, coef, parts))
            state_dict[f"{m}.lora_A.weight"], state_dict[f"{m}.lora_B.weight"] = a.to(dtype), b.to(dtype)
            ranks[m] = a.shape[0]
    elif combination == "svd":
        if not rank or rank < 1:
            raise StudioError("--combination svd needs --rank R (R >= 1)")
        deltas, kernels = {}, {}
        for m in modules:
            for e, sd, w in zip(entries, tensors, weights):
                if any(k.startswith(f"{m}.") for k in sd):
                    d = w * delta_weight(e.meta, sd, m)
                    deltas[m] = deltas[m] + d if m in deltas else d
                    kernels[m] = _kernel(e.meta, sd, m)
        state_dict, ranks = _lora_from_deltas(
            deltas, kernels, rank, dtype if dtype.is_floating_point else torch.float32
        )
    else:
        raise StudioError(f"unknown combination {combination!r}; use cat, linear or svd")
    first = entries[0].meta
    method_config = {"sources": [n for n, _ in sources], "weights": weights, "combination": combination, "rank": rank}
    if columns is not None:  # still orthogonal: it merges on with adapters of other columns
        method_config.update(basis_seed=first.method_config.get("basis_seed"), columns=[list(c) for c in columns])
    meta = AdapterMeta(
        method=ORTHOGONAL if columns is not None else "merge",
        method_config=method_config,
        kind=first.kind if len({e.meta.kind for e in entries}) == 1 else "unknown",
        trigger_words=list(dict.fromkeys(t for e in entries for t in e.meta.trigger_words)),
        tags=list(dict.fromkeys(t for e in entries for t in e.meta.tags)),
        base=copy.deepcopy(first.base) if len(fingerprints) <= 1 else type(first.base)(family=first.base.family),
        ranks=ranks,
        alphas={m: float(r) for m, r in ranks.items()}
        if combination != "linear"
        else {m: float(r) for m, r in ranks.items()},
    )
    return library.add(name, state_dict, meta, overwrite=overwrite)


def resize(name: str, rank: int, *, new_name: str | None = None, library: Library | None = None) -> dict[str, float]:
    """Re-factor every module to at most `rank` by SVD (alpha = rank); returns each module's relative error."""
    library = library or Library()
    if rank < 1:
        raise StudioError("--rank must be at least 1")
    entry = library.get(name)
    sd, meta = entry.state_dict(), entry.meta
    if meta.peft_type == sparse.PEFT_TYPE:
        raise StudioError(f"{name!r} is a sparse delta (SaRA), which has no rank to resize; export it with "
                          "--format diff or merge it (an exact sum)")
    modules = modules_of(sd)
    deltas = {m: delta_weight(meta, sd, m) for m in modules}
    dtype = next(iter(sd.values())).dtype
    new_sd, ranks = _lora_from_deltas(deltas, {m: _kernel(meta, sd, m) for m in modules}, rank, dtype)
    errors = {}
    for m in modules:
        approx = new_sd[f"{m}.lora_B.weight"].float().flatten(1) @ new_sd[f"{m}.lora_A.weight"].float().flatten(1)
        errors[m] = float((approx - deltas[m]).norm() / deltas[m].norm().clamp_min(1e-12))
    new_meta = copy.deepcopy(meta)
    new_meta.peft_type, new_meta.ranks, new_meta.lokr = "LORA", ranks, {}
    new_meta.alphas = {m: float(r) for m, r in ranks.items()}
    new_meta.method_config = {**meta.method_config, "resized_from": name, "resize_rank": rank}
    target = new_name or name
    library.add(target, new_sd, new_meta, overwrite=target == name, extras_from=entry.folder)
    return errors


def edit(
    name: str,
    *,
    trigger_words: list[str] | None = None,
    tags: list[str] | None = None,
    add_tags: list[str] | None = None,
    remove_tags: list[str] | None = None,
    kind: str | None = None,
    description: str | None = None,
    new_name: str | None = None,
    library: Library | None = None,
) -> Entry:
    """Change trigger words, tags, kind, description or name; tensors are untouched."""
    library = library or Library()
    meta = copy.deepcopy(library.get(name).meta)
    if trigger_words is not None:
        meta.trigger_words = [t.strip() for t in trigger_words if t.strip()]
    if tags is not None:
        meta.tags = [t.strip() for t in tags if t.strip()]
    meta.tags = [t for t in dict.fromkeys([*meta.tags, *(add_tags or [])]) if t not in (remove_tags or [])]
    if kind is not None:
        if kind not in KINDS:
            raise StudioError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        meta.kind = kind
    if description is not None:
        meta.description = description
    return library.replace_meta(name, meta, new_name=new_name)
