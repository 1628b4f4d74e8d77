"""`studio bench train` measures each method in its own process and reports side-by-side figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from studio.cli import main


@pytest.mark.heavy
def test_bench_train_reports_each_method(tiny_dirs: dict, capsys) -> None:
    code = main(["bench", "train", "--model", str(tiny_dirs["sd1"]), "--steps", "3", "--threads", "1",
                 "--device", "cpu", "--method", "dreambooth_lora", "--method", "kronecker", "--num-class-images", "4"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    # the emblem's prior preservation rendered the 4 asked class images once, and the second method reused them
    rendered = list((Path(os.environ["STUDIO_CACHE"]) / "class-images").glob("*/*.png"))
    assert report["num_class_images"] == 4 and len(rendered) == 4
    lora, kron = report["rows"]
    assert [lora["method"], kron["method"]] == ["dreambooth_lora", "kronecker"]
    for row in (lora, kron):
        assert row["trainable_params"] > 0 and row["steps_timed"] == 2 and row["s_per_step_median"] > 0
        assert row["bytes"]["params"] == 4 * row["trainable_params"]  # fp32 trainable tensors
        assert row["bytes"]["total"] == 4 * row["bytes"]["params"]  # + grads + AdamW's two moments
        assert row["peak_memory_bytes"] > row["bytes"]["total"]
    assert lora["params_ratio"] == 1.0
    assert kron["params_ratio"] == round(kron["trainable_params"] / lora["trainable_params"], 4) != 1.0
