"""The bench layer: `studio bench NAME`, measurements too long for the test suite.

It sits above the trainers and the composers (DESIGN.md section 1) and may use both, which neither may do for the
other: the adapter bench trains adapters and judges them, the compose bench trains a set and composes it. Each module
exposes `register_bench(subparsers)`; the order here is the order of `studio bench --help`.
"""

from __future__ import annotations

import argparse
import importlib


BENCHES = [
    "benches.world",  # studio bench world: the evaluator against renders, VAE round trips, world CLIP
    "benches.base",  # studio bench base: the base's attribute accuracy
    "benches.generate",  # studio bench generate: seconds per image
    "benches.train",  # studio bench train: parameters, memory and seconds per step per method
    "benches.adapters",  # studio bench adapters: adapters at their defaults against the trainer bar
    "benches.merge",  # studio bench merge: two emblems trained apart, summed (orthogonal adaptation's bar)
    "benches.compose",  # studio bench compose: composers side by side on Shapes World pairs
    "benches.retrieve",  # studio bench retrieve: AutoLoRA retrieval by prompt on a library of Shapes World adapters
    "benches.kernel",  # studio bench kernel: the fused adapter projection against its floor and PEFT
    "benches.gpu",  # studio bench gpu: generation and training speed on a GPU
    "benches.memory",  # studio bench memory: the generation memory estimate against measured peak RSS
    "benches.fuzz",  # studio bench fuzz: mutated adapter files through import: clean errors, never crashes
    "benches.library_scale",  # studio bench library: 1,000 adapters: list, search, <lora:...>; killed writers
    "benches.ui_load",  # studio bench ui-load: 20 simultaneous requests, cancel, queue limit, upload limit
    "benches.kill_resume",  # studio bench kill-resume: training SIGKILLed at seeded points resumes exactly
    "benches.report",  # studio bench report: every trainer and composer side by side, tables, plots, --compare
]


def register_benches(subparsers: argparse._SubParsersAction) -> None:
    for name in BENCHES:
        importlib.import_module(name).register_bench(subparsers)
