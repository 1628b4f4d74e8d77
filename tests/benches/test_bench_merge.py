"""`studio bench merge`: its prompts name both emblems in their places, and it runs end to end on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoKrConfig, LoraConfig, inject_adapter_in_model
from torch import nn

from benches.crosstalk import crosstalk, lora_layers
from benches.merge import _write, both_prompts, paired_se, run_bench, verdicts
from studio.errors import StudioError


def test_both_prompts_name_each_emblem_by_its_trigger_in_its_place() -> None:
    prompts = both_prompts([11, 22], ("sks", "zwx"))
    assert len(prompts) == 16 and len({p.text for p in prompts}) == 16
    first = prompts[0]
    assert first.text == "a large sks emblem on the left and a large zwx emblem on the right on a white background"
    assert [(o.position, o.emblem) for o in first.scene.objects] == [("left", 11), ("right", 22)]


def test_verdicts_apply_each_bar() -> None:
    ortho = {"method": "orthogonal", "emblems": [{"drop": 0.0}, {"drop": 0.1}], "both": 0.0, "both_regional": 0.6}
    lora = {"method": "dreambooth_lora", "emblems": [{"drop": 0.3}, {"drop": 0.0}], "both": 0.0}
    assert verdicts([ortho, lora]) == {"orthogonal keeps each emblem": False,
                                       "orthogonal shows both (regional sampling)": True,
                                       "dreambooth_lora sum loses an emblem": True}
    assert not verdicts([{**ortho, "both": 0.9, "both_regional": 0.4}])["orthogonal shows both (regional sampling)"]


def test_paired_se_is_the_noise_of_the_per_image_drop() -> None:
    assert paired_se([1, 1, 0, 1], [1, 1, 0, 1]) == 0.0  # the same hits: no noise in the drop
    # per-image drops 1, 0, 0, 0: mean 0.25, sample s.d. 0.5, s.e. 0.5 / 2
    assert paired_se([1, 1, 0, 1], [0, 1, 0, 1]) == 0.25
    assert paired_se([1], [0]) == 0.0


def test_crosstalk_is_the_other_residual_over_the_own_on_each_concepts_inputs() -> None:
    model = nn.Sequential()
    model.add_module("proj_in", nn.Linear(4, 3))
    for name in ("a", "b"):
        inject_adapter_in_model(LoraConfig(r=1, lora_alpha=2, target_modules=["proj_in"]), model, adapter_name=name)
    layer = model.proj_in
    with torch.no_grad():  # a reads input axis 0, b axis 1 (rows of one orthogonal basis); both write
        layer.lora_A["a"].weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        layer.lora_A["b"].weight.copy_(torch.tensor([[0.0, 1, 0, 0]]))
        layer.lora_B["a"].weight.copy_(torch.tensor([[1.0], [2], [0]]))
        layer.lora_B["b"].weight.copy_(torch.tensor([[0.0], [3], [1]]))
    layer.scaling["b"] = 0.0  # loaded at weight 0 while a is drawn: rho reads the residual at weight 1 all the same
    inputs = [torch.tensor([[2.0, 0, 5, 0]]), torch.tensor([[1.0, 1, 0, 0]])]
    rho = crosstalk(model, ["a", "b"], lambda i: model(inputs[i]))
    # concept a's input has nothing on b's row: b is silent. Concept b's input reads 1 on both rows: own residual
    # 2 * [0, 3, 1] (energy 40), a's 2 * [1, 2, 0] (energy 20), rho = sqrt(20 / 40)
    assert rho["a"] == {"all": 0.0, "proj_in": 0.0}
    assert rho["b"]["all"] == pytest.approx(0.5 ** 0.5, abs=1e-4) and rho["b"]["proj_in"] == rho["b"]["all"]
    with pytest.raises(StudioError, match="at least two"):
        crosstalk(model, ["a"], lambda i: None)
    with pytest.raises(StudioError, match="no layer holds"):
        crosstalk(model, ["a", "c"], lambda i: None)


def test_adapters_that_are_not_lora_get_no_crosstalk_and_the_table_says_so(tmp_path: Path) -> None:
    model = nn.Sequential()
    model.add_module("proj_in", nn.Linear(4, 3))
    for name in ("a", "b"):
        inject_adapter_in_model(LoKrConfig(r=2, target_modules=["proj_in"]), model, adapter_name=name)
    assert lora_layers(model, ["a", "b"]) == {}  # the merge bench then skips the measurement
    emblem = {"seed": 7, "alone": 0.9, "merged": 0.6, "drop": 0.3, "drop_se": 0.1, "images": 20, "crosstalk": None}
    row = {"method": "kronecker", "emblems": [emblem, {**emblem, "seed": 8}], "both": 0.0, "both_regional": 0.5,
           "crosstalk": None}
    report = {"rows": [row], "threads": 2, "steps": 20, "verdicts": {}}
    _write(tmp_path, report, {"x": [torch.zeros(3, 8, 8)]})
    assert "| kronecker | 7 | 20 | 0.90 | 0.60 | +0.30 (0.10) | - |" in (tmp_path / "merge-bench.md").read_text()
    assert not (tmp_path / "merge-bench-crosstalk.png").exists()


def test_draws_below_one_are_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(StudioError, match="--draws must be at least 1"):
        run_bench("no-such-model", ["orthogonal"], tmp_path, draws=0)
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.heavy
def test_bench_runs_end_to_end(tiny_dirs: dict, tmp_path: Path) -> None:
    """Two steps on 3 renders, 2 prompts per emblem at 2 draws and 2 pairs: the whole path (train two, merge by sum,
    judge alone, summed and both), not its figures, which `studio bench merge` measures."""
    small = {"train_steps": 2, "sample_steps": 2, "batch_size": 1, "world_images": 3, "num_class_images": 2,
             "device": "cpu", "world_objects": 2}
    report = run_bench(str(tiny_dirs["sd1"]), ["orthogonal"], tmp_path, steps=2, overrides=small, per_emblem=2,
                       n_both=2, draws=2)
    (row,) = report["rows"]
    assert [e["images"] for e in row["emblems"]] == [4, 4]  # 2 prompts x 2 draws, alone and summed on the same seeds
    assert all(0.0 <= e["drop_se"] <= 0.5 for e in row["emblems"])
    assert row["method"] == "orthogonal" and len(row["emblems"]) == 2 and 0.0 <= row["both"] <= 1.0
    assert 0.0 <= row["both_regional"] <= 1.0
    assert set(report["verdicts"]) == {"orthogonal keeps each emblem", "orthogonal shows both (regional sampling)"}
    table = (tmp_path / "merge-bench.md").read_text()
    assert "paired s.e." in table and "crosstalk rho" in table
    assert set(row["crosstalk"]) == {"merge-orthogonal-0", "merge-orthogonal-1"}
    assert all(r["all"] >= 0 and "conv" in r for r in row["crosstalk"].values())
    assert [e["crosstalk"] for e in row["emblems"]] == [r["all"] for r in row["crosstalk"].values()]
    assert "| orthogonal |" in table and "both, regional" in table and "training renders of up to 2 objects" in table
    assert report["world_objects"] == 2
    assert (tmp_path / "merge-bench-grid.png").is_file() and (tmp_path / "merge-bench-crosstalk.png").is_file()
