"""Time the fused adapter projection beside its floor and the unfused paths it replaces, at SDXL attention shapes.

    python -m lora_kernels.bench [--out DIR] [--quick]

Per shape (batch 2, K = 4 adapters of rank 16 on each of q, k, v):
  merged     base GEMM with merged weights, W + sum_k s_k B_k A_k: the floor (diffusers fuse_lora)
  fused      lora_kernels.dispatch (Triton on CUDA) with per-token S (2, N, 4)
  reference  lora_kernels.reference (plain torch, concatenated ranks) with the same S
  peft       peft LoraLayers with 4 active adapters, constant scales (PEFT has no per-token S); without peft, the same
             per-adapter loop written by hand (peft/tuners/lora/layer.py, Linear.forward)
  loop       per-adapter loop with per-token S, kohya-style masked LoRA: the unfused path the kernel replaces
Self-attention projects q|k|v of the hidden states; cross-attention q on the hidden states and k|v on the 77x2048
context. Then GroupNorm with statistics per region beside GroupNorm (`lora_kernels.bench_norm`). CUDA: bf16,
triton.testing.do_bench (median ms of eager calls, L2 flushed, host overhead included) and do_bench_cudagraph
(replayed from a CUDA graph: GPU time, L2 warm). CPU: fp32, median of 7 runs after 2 warm-ups; CPU numbers check
that everything runs and are not the bar. Writes DIR/kernel_bench.json and DIR/kernel_bench.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_kernels import dispatch, reference
from lora_kernels.bench_norm import norm_markdown, norm_rows


N_ADAPTERS, RANK, BATCH, CONTEXT = 4, 16, 2, (77, 2048)
SHAPES = [("self", 640, 4096), ("self", 1280, 1024), ("cross", 640, 4096), ("cross", 1280, 1024)]  # (kind, d, N)
PATHS = ("merged", "fused", "reference", "peft", "loop")


def timer(device: torch.device, graph: bool = False) -> Callable[[Callable[[], Any]], float]:
    """A function that times `fn()` in ms: do_bench's median on CUDA (`graph`: replayed from a CUDA graph, so GPU
    time without host overhead), else the median of 7 runs after 2 warm-ups."""
    if device.type == "cuda":
        import triton.testing

        if graph:
            return lambda fn: float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))
        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu(fn: Callable[[], Any]) -> float:
        for _ in range(2):
            fn()
        runs = []
        for _ in range(7):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return statistics.median(runs)

    return cpu


def time_paths(fns: dict[str, Callable[[], Any]], timers: dict[str, Callable]) -> dict[str, Any]:
    """ms of each path per timer (`{path}_{unit}`), and each path's ratio to the first, the floor (`{path}_{unit}_x`);
    a path that fails gives its error and the others still their numbers."""
    row: dict[str, Any] = {}
    floor = next(iter(fns))
    for unit, bench in timers.items():
        for name, fn in fns.items():
            try:
                row[f"{name}_{unit}"] = bench(fn)
            except Exception as exc:  # keep the other paths' numbers; say what failed
                row[f"{name}_{unit}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        for name in list(fns)[1:]:
            if row.get(f"{floor}_{unit}") and f"{name}_{unit}" in row:
                row[f"{name}_{unit}_x"] = row[f"{name}_{unit}"] / row[f"{floor}_{unit}"]
    return row


def make_case(kind: str, d: int, tokens: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random weights, adapters (nonzero A and B) and inputs for one attention layer; everything in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    d_ctx = CONTEXT[1] if kind == "cross" else d

    def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    d_in = {"q": d, "k": d_ctx, "v": d_ctx}
    weights = {p: rand(d, d_in[p], std=d_in[p] ** -0.5) for p in "qkv"}
    # adapters[p][k] = (A (r, d_in), B (d, r)); B folds alpha / r = 1, scaled to a visible but small change
    adapters = {p: [(rand(RANK, d_in[p], std=d_in[p] ** -0.5), rand(d, RANK, std=0.1 * RANK**-0.5)) for _ in range(4)]
                for p in "qkv"}  # fmt: skip
    x = rand(BATCH, tokens, d)  # (B, N, d)
    context = rand(BATCH, CONTEXT[0], d_ctx) if kind == "cross" else x  # (B, L, d_ctx)
    region = torch.randint(0, N_ADAPTERS, (BATCH, tokens), generator=g)
    s_tok = F.one_hot(region, N_ADAPTERS).to(device=device, dtype=torch.float32)  # (B, N, K): one adapter per token
    s_ctx = s_tok.amax(dim=1)  # (B, K): the processor's default for cross-attention k|v
    return {"kind": kind, "weights": weights, "adapters": adapters, "x": x, "context": context,
            "s_tok": s_tok, "s_ctx": s_ctx, "s_const": torch.full((N_ADAPTERS,), 0.7, device=device)}  # fmt: skip


def groups(case: dict) -> list[tuple[torch.Tensor, str]]:
    """(input, projections) that read the same input: q|k|v for self-attention, q and k|v for cross-attention."""
    if case["kind"] == "self":
        return [(case["x"], "qkv")]
    return [(case["x"], "q"), (case["context"], "kv")]


def merged_weights(case: dict, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """W_p + sum_k s_k B_pk A_pk, computed in fp32 and cast back (diffusers fuse_lora)."""
    out = {}
    for p, w in case["weights"].items():
        delta = sum(float(s[k]) * b.float() @ a.float() for k, (a, b) in enumerate(case["adapters"][p]))
        out[p] = (w.float() + delta).to(w.dtype)
    return out


def path_fns(case: dict, peft_layers: dict | None) -> dict[str, Callable[[], Any]]:
    """One zero-argument function per path in PATHS, each computing this layer's q, k and v."""
    w_merged = merged_weights(case, case["s_const"])
    merged = [(x, torch.cat([w_merged[p] for p in ps])) for x, ps in groups(case)]  # one GEMM per input
    packs = [(x, ps, reference.pack([case["weights"][p] for p in ps], [None] * len(ps),
                                    [case["adapters"][p] for p in ps])) for x, ps in groups(case)]  # fmt: skip
    scales = {"qkv": case["s_tok"], "q": case["s_tok"], "kv": case["s_ctx"]}

    consts = case["s_const"].tolist()  # host floats, read once: no device sync inside the timed (or captured) calls

    def loop(masked: bool) -> list[torch.Tensor]:
        out = []
        for p in "qkv":
            x = case["x"] if p == "q" or case["kind"] == "self" else case["context"]
            s = case["s_tok"] if x is case["x"] else case["s_ctx"][:, None, :]  # (B, N or 1, K)
            y = F.linear(x, case["weights"][p])
            for k, (a, b) in enumerate(case["adapters"][p]):
                lora = F.linear(F.linear(x, a), b)  # (B, N, d): lora_B(lora_A(x))
                y = y + (lora * s[..., k : k + 1].to(lora.dtype) if masked else lora * consts[k])
            out.append(y)
        return out

    def peft() -> list[torch.Tensor]:
        if peft_layers is None:
            return loop(masked=False)
        return [peft_layers[p](case["x"] if p == "q" or case["kind"] == "self" else case["context"]) for p in "qkv"]

    return {
        "merged": lambda: [F.linear(x, w) for x, w in merged],
        "fused": lambda: [dispatch.projections(x, pk, scales[ps]) for x, ps, pk in packs],
        "reference": lambda: [reference.projections(x, pk, scales[ps]) for x, ps, pk in packs],
        "peft": peft,
        "loop": lambda: loop(masked=True),
    }


def peft_layers(case: dict) -> dict[str, torch.nn.Module] | None:
    """to_q/to_k/to_v as peft LoraLayers, the case's 4 adapters active at its constant scales; None without peft."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except Exception:  # not installed, or its transformers import fails
        return None
    w = case["weights"]
    module = torch.nn.Module()
    for p in "qkv":
        setattr(module, f"to_{p}", torch.nn.Linear(w[p].shape[1], w[p].shape[0], bias=False))
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    names = [f"adapter{k}" for k in range(N_ADAPTERS)]
    for name in names:
        inject_adapter_in_model(config, module, adapter_name=name)
    module.to(device=w["q"].device, dtype=w["q"].dtype)
    layers = {}
    with torch.no_grad():
        for p in "qkv":
            layer = getattr(module, f"to_{p}")
            layer.base_layer.weight.copy_(w[p])
            layer.set_adapter(names)
            for k, name in enumerate(names):
                a, b = case["adapters"][p][k]
                layer.lora_A[name].weight.copy_(a)
                layer.lora_B[name].weight.copy_(b)
                layer.set_scale(name, float(case["s_const"][k]))  # scaling = scale * alpha / r
            layers[p] = layer
    return layers


def accuracy(device: torch.device, dtype: torch.dtype, tokens: int) -> dict[str, float]:
    """Relative errors (Frobenius) of the bench dtype against float64, and constant S against merged weights."""
    case = make_case("self", 640, tokens, device, dtype, seed=1)
    case64 = make_case("self", 640, tokens, device, torch.float64, seed=1)
    packed, packed64 = (reference.pack([c["weights"][p] for p in "qkv"], [None] * 3, [c["adapters"][p] for p in "qkv"])
                        for c in (case, case64))  # fmt: skip

    def rel(y: torch.Tensor, want: torch.Tensor) -> float:
        return float((y.double() - want).norm() / want.norm())

    with torch.no_grad():
        want = torch.cat(reference.projections(case64["x"], packed64, case64["s_tok"].double()), -1)
        want_const = torch.cat(reference.projections(case64["x"], packed64, case64["s_const"].double()), -1)
        fused = torch.cat(dispatch.projections(case["x"], packed, case["s_tok"]), -1)
        ref = torch.cat(reference.projections(case["x"], packed, case["s_tok"]), -1)
        fused_const = torch.cat(dispatch.projections(case["x"], packed, case["s_const"]), -1)
        w_merged = merged_weights(case, case["s_const"])
        merged = F.linear(case["x"], torch.cat([w_merged[p] for p in "qkv"]))
    return {
        "fused_vs_float64": rel(fused, want),
        "reference_vs_float64": rel(ref, want),
        "fused_const_vs_merged": rel(fused_const, merged.double()),
        "fused_const_vs_float64": rel(fused_const, want_const),
        "merged_vs_float64": rel(merged, want_const),
    }


def run(quick: bool = False, device: torch.device | None = None) -> dict:
    """Time every path at every shape; returns the JSON-ready results."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shrink = 16 if quick and device.type == "cpu" else 1  # CPU --quick: 1/16 of the tokens
    shapes = SHAPES[::2] if quick else SHAPES
    timers = {"ms": timer(device)} | ({"graph_ms": timer(device, graph=True)} if device.type == "cuda" else {})
    rows = []
    for kind, d, tokens in shapes:
        case = make_case(kind, d, tokens // shrink, device, dtype)
        layers = peft_layers(case)
        fns = path_fns(case, layers)
        shape = f"{kind} d={d} N={tokens // shrink}" + (" ctx=77x2048" if kind == "cross" else "")
        row: dict[str, Any] = {"shape": shape, "peft": "peft" if layers is not None else "hand-written"}
        with torch.no_grad():
            row.update(time_paths({name: fns[name] for name in PATHS}, timers))
        rows.append(row)
    norms = norm_rows(device, dtype, lambda fns: time_paths(fns, timers), quick)
    probe = make_case("self", 640, 8, device, dtype)
    backend = dispatch.choose_backend(probe["x"], probe["weights"]["q"], [probe["adapters"]["q"][0][0]])
    try:
        acc: dict[str, Any] = accuracy(device, dtype, 1024 // shrink)
    except Exception as exc:
        acc = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    note = "CPU timings check that the paths run; they are not the bar" if device.type != "cuda" else ""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": str(dtype).removeprefix("torch."), "fused_backend": backend, "torch": torch.__version__,
            "triton": _version("triton"), "peft": _version("peft"), "adapters": N_ADAPTERS, "rank": RANK,
            "batch": BATCH, "quick": quick, "rows": rows, "norm_rows": norms, "accuracy": acc,
            "note": note}  # fmt: skip


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except Exception:
        return None


def markdown(result: dict) -> str:
    """The timing table (ms, and the ratio to merged weights) and the accuracy section."""
    head = f"{result['device']}, {result['dtype']}, fused backend: {result['fused_backend']}, K={result['adapters']}"
    lines = [head + f" r={result['rank']}, batch {result['batch']}; ms per layer (ratio to merged weights)"]
    titles = {"ms": "eager calls (host overhead included)", "graph_ms": "replayed from a CUDA graph (GPU time)"}
    for unit, title in titles.items():
        if not any(f"merged_{unit}" in row for row in result["rows"]):
            continue
        lines += ["", f"{title}:", "", "| shape | " + " | ".join(PATHS) + " |", "|---" * (len(PATHS) + 1) + "|"]
        for row in result["rows"]:
            cells = []
            for name in PATHS:
                ratio = f" ({row[f'{name}_{unit}_x']:.2f}x)" if f"{name}_{unit}_x" in row else ""
                cells.append(f"{row[f'{name}_{unit}']:.3f}{ratio}" if f"{name}_{unit}" in row else "error")
            lines.append(f"| {row['shape']} | " + " | ".join(cells) + " |")
    lines += norm_markdown(result.get("norm_rows", []), titles)
    lines += ["", "accuracy (relative Frobenius error):"]
    lines += [f"- {key}: {value:.3e}" if isinstance(value, float) else f"- {key}: {value}"
              for key, value in result["accuracy"].items()]  # fmt: skip
    errors = [f"- {row['shape']} {k}: {v}" for row in result["rows"] + result.get("norm_rows", [])
              for k, v in row.items() if k.endswith("_error")]
    if errors:
        lines += ["", "errors:", *errors]
    if result["note"]:
        lines += ["", result["note"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for kernel_bench.json and kernel_bench.md")
    parser.add_argument("--quick", action="store_true", help="two shapes; on CPU also 1/16 of the tokens")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(quick=args.quick)
    result["seconds"] = round(time.perf_counter() - start, 1)
    table = markdown(result)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "kernel_bench.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
