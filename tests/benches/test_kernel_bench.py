"""`studio bench kernel --quick` (on the CPU in CI; bf16 where CUDA is visible): every path runs beside the
merged-weight floor and agrees with float64."""

from __future__ import annotations

import json
from pathlib import Path

from studio.cli import main


def test_kernel_bench_runs_every_path_and_checks_accuracy(tmp_path: Path) -> None:
    assert main(["bench", "kernel", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert result["quick"] and result["adapters"] == 4 and result["rank"] == 16
    assert len(result["rows"]) == 2  # --quick: two of the four SDXL attention shapes
    for row in result["rows"]:
        for path in ("merged", "fused", "reference", "peft", "loop"):
            assert row[f"{path}_ms"] > 0
        for path in ("fused", "reference", "peft", "loop"):  # each against the floor, in the same run
            assert abs(row[f"{path}_ms_x"] - row[f"{path}_ms"] / row["merged_ms"]) < 1e-6
    accuracy = result["accuracy"]
    tolerance = 1e-5 if result["dtype"] == "float32" else 2e-2  # fp32 on the CPU; bf16 where CUDA is visible
    assert accuracy["fused_vs_float64"] < tolerance and accuracy["fused_const_vs_merged"] < tolerance
    assert len(result["norm_rows"]) == 2  # GroupNorm with statistics per region: two of the four UNet shapes
    for row in result["norm_rows"]:
        for path in ("region", "reference"):  # beside GroupNorm, in the same run
            assert abs(row[f"{path}_ms_x"] - row[f"{path}_ms"] / row["group_norm_ms"]) < 1e-6
        assert row["region_vs_float64"] < tolerance
    table = (tmp_path / "kernel_bench.md").read_text()
    assert "| shape | group_norm | region | reference | region vs float64 |" in table
    assert "| shape | merged | fused |" in table and table.count("| self d=") + table.count("| cross d=") == 2
    assert "fused_const_vs_merged" in table
