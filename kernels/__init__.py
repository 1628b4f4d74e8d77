"""Fused multi-adapter projections: `y = x W^T + b + sum_k S[t, k] (x A_k^T) B_k^T`, q/k/v at once.

`reference` is the specification in plain torch, `triton_lora` the same functions in Triton (CUDA), `dispatch`
picks one per call (`STUDIO_KERNELS=reference|triton|auto`) and holds the diffusers attention processor, and
`python -m kernels.bench` times both against merged weights and per-adapter PEFT layers. DESIGN.md section 7.

This package imports nothing of the project: only torch, the standard library and (lazily) triton.

Name clash: Hugging Face's `kernels` distribution (a hard requirement of transformers 5) is also a top-level
package called `kernels`. With the repository root first on `sys.path` this package shadows it, and
`transformers.modeling_utils` (`from kernels import CUDAProperties, ...`) would fail to import. So, until the package
is renamed, this package also forwards: it appends the other `kernels` directory to `__path__` (its private
submodules, `kernels._internals`, `kernels._rust`, ..., resolve there; none of our module names collide) and serves
any top-level name it does not define from that package's `__init__`, loaded on first use.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from kernels.dispatch import (
    AdapterFactors,
    FusedLoRAAttnProcessor,
    choose_backend,
    fused_qkv,
    lora_linear,
    projections,
    region_scales,
)
from kernels.reference import PackedProjections, column_scales, pack, token_scales


__all__ = [
    "AdapterFactors",
    "FusedLoRAAttnProcessor",
    "PackedProjections",
    "choose_backend",
    "column_scales",
    "fused_qkv",
    "lora_linear",
    "pack",
    "projections",
    "region_scales",
    "token_scales",
]

_ROOT = Path(__file__).resolve().parent.parent
_OTHER = importlib.machinery.PathFinder.find_spec(__name__, [p for p in sys.path if Path(p or ".").resolve() != _ROOT])
if _OTHER is not None and _OTHER.submodule_search_locations:
    __path__.extend(str(p) for p in _OTHER.submodule_search_locations)  # ours first, then theirs
_other_module: ModuleType | None = None


def __getattr__(name: str) -> Any:
    """Names this package does not define come from the other `kernels` package (see the module docstring)."""
    global _other_module
    own_module = (Path(__file__).parent / f"{name}.py").exists()  # e.g. `from kernels import bench` before import
    if _OTHER is None or _OTHER.origin is None or own_module or (name.startswith("__") and name != "__version__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _other_module is None:
        spec = importlib.util.spec_from_file_location(f"{__name__}._other_init", _OTHER.origin)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = __name__  # its `from kernels._internals import ...` resolve through our __path__
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _other_module = module
    return getattr(_other_module, name)
