"""Shapes World: a small procedural world where every feature runs offline and quality is measured exactly.

DESIGN.md section 3. The public API, imported lazily so that `studio --help` does not load torch:

- `render(scenes, seed=0) -> Tensor`: float images in [0, 1], (3, 64, 64) for one scene or (B, 3, 64, 64).
- `parse_caption(text) -> Scene`, `Scene(objects, background, texture).caption()`, `SceneObject`.
- `evaluate(image, scene, emblem=None, texture=None) -> dict`: per-object verdicts and aggregates.
- `sample_scenes`, `world_batch`, `emblem_dataset`, `texture_dataset`: seeded datasets with train/eval splits.
- `emblem(seed)`, `distractors(seed)`; `to_model_range` ([0, 1] -> [-1, 1]); `to_pil`.
"""

from __future__ import annotations

import importlib
from typing import Any


_EXPORTS = {
    "render": "studio.world.renderer",
    "to_model_range": "studio.world.renderer",
    "to_pil": "studio.world.renderer",
    "parse_caption": "studio.world.grammar",
    "Scene": "studio.world.grammar",
    "SceneObject": "studio.world.grammar",
    "evaluate": "studio.world.evaluator",
    "sample_scenes": "studio.world.datasets",
    "world_batch": "studio.world.datasets",
    "emblem_dataset": "studio.world.datasets",
    "texture_dataset": "studio.world.datasets",
    "Emblem": "studio.world.emblems",
    "emblem": "studio.world.emblems",
    "distractors": "studio.world.emblems",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'studio.world' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
