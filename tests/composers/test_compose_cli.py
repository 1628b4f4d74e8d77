"""`studio compose` end to end on the tiny SD1 folder with two library adapters."""

from __future__ import annotations

import numpy as np
from composer_helpers import add_random_adapter
from PIL import Image

from studio.cli import main
from studio.models import load_pipeline
from studio.pnginfo import read_parameters


def test_compose_cli_writes_pngs_that_record_adapters_and_composer(tiny_dirs, tmp_path, capsys) -> None:
    model = str(tiny_dirs["sd1"])
    pipe = load_pipeline(model)
    add_random_adapter(pipe, "alpha", 1, kind="style")
    add_random_adapter(pipe, "beta", 2, kind="subject")
    common = ["--model", model, "--steps", "2", "--size", "32x32", "--seed", "3"]
    out = tmp_path / "switch.png"
    flags = "--adapters alpha:0.8 --composer switch --tau 1 --order beta,alpha".split()
    assert main(["compose", *common, "--prompt", "a red star <lora:beta:0.5>", *flags, "--out", str(out)]) == 0
    params = read_parameters(out)
    assert params["prompt"] == "a red star"
    assert params["adapters"] == [{"name": "alpha", "weight": 0.8}, {"name": "beta", "weight": 0.5}]
    assert params["composer"] == "switch"
    assert params["composer_config"] == {"tau": 1, "order": ["beta", "alpha"]}
    assert params["seed"] == 3 and params["steps"] == 2

    plain = tmp_path / "plain.png"
    assert main(["generate", *common, "--prompt", "a red star", "--out", str(plain)]) == 0
    assert np.abs(np.asarray(Image.open(out), dtype=float) - np.asarray(Image.open(plain), dtype=float)).max() > 0

    merged = tmp_path / "merge.png"
    flags = "--adapters alpha,beta:0.5 --composer composite --num-images 2".split()
    assert main(["compose", *common, "--prompt", "a red star", *flags, "--out", str(merged)]) == 0
    assert (tmp_path / "merge-000.png").is_file() and (tmp_path / "merge-grid.png").is_file()
    assert read_parameters(tmp_path / "merge-001.png")["seed"] == 4

    capsys.readouterr()
    assert main(["compose", *common, "--prompt", "x", "--adapters", "alpha", "--tau", "2", "--out", str(out)]) == 2
    assert "--tau does not apply to --composer merge" in capsys.readouterr().err
    for flags, message in [
        (["--adapters", "nobody"], "nobody"),
        ([], "no adapters given"),
        (["--adapters", "alpha", "--composer", "blend"], "unknown composer 'blend'"),
        (["--adapters", "alpha", "--composer", "merge", "--fused", "--schedule", "linear:1:0"], "fused merge"),
        (["--adapters", "alpha", "--concept-masks"], "--concept-masks does not apply to --composer merge"),
        (["--adapters", "alpha", "--box", "alpha:0,0,1,1"], "--box does not apply to --composer merge"),
        (["--adapters", "alpha", "--region", "a red star:0,0,1,1"], "--region does not apply to --composer merge"),
    ]:
        assert main(["compose", *common, "--prompt", "x", *flags, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_clora_takes_the_papers_concept_masks_from_the_cli(tiny_dirs, tmp_path) -> None:
    model = str(tiny_dirs["sd1"])
    pipe = load_pipeline(model)
    add_random_adapter(pipe, "qa", 1, kind="subject")
    add_random_adapter(pipe, "qb", 2, kind="subject")
    prompt = "a large qa emblem on the left and a large qb emblem on the right on a white background"
    common = ["--model", model, "--steps", "2", "--size", "32x32", "--prompt", prompt, "--adapters", "qa,qb",
              "--composer", "clora"]
    for name, flags in (("place", []), ("concept", ["--concept-masks"])):  # plan() maps the switch to the tokens
        out = tmp_path / f"{name}.png"
        assert main(["compose", *common, *flags, "--out", str(out)]) == 0
        assert read_parameters(out)["composer_config"]["place_masks"] is (name == "place")


def test_compose_by_prompt_says_what_it_retrieved_and_adds_each_trigger_once(tiny_dirs, tmp_path, capsys) -> None:
    from studio.library import Library

    model = str(tiny_dirs["sd1"])
    pipe = load_pipeline(model)
    lib = Library()
    for name, seed, text in (("star", 1, "a red star with stripes"), ("ring", 2, "a red ring with stripes")):
        add_random_adapter(pipe, name, seed, triggers=[name, "zq wv"])  # a trigger both share, as merged ones do
        entry = lib.get(name)
        entry.meta.description = text
        lib.replace_meta(name, entry.meta)
    out = tmp_path / "auto.png"
    args = ["compose", "--model", model, "--steps", "2", "--size", "32x32", "--prompt", "a red star with stripes",
            "--composer", "autolora", "--out", str(out)]
    assert main(args) == 0
    assert "retrieved: star, ring" in capsys.readouterr().err
    params = read_parameters(out)
    assert params["prompt"] == "a red star with stripes, zq wv ring"  # "star" is in the prompt already; zq wv once
    assert [a["name"] for a in params["adapters"]] == ["star", "ring"]
    # a trigger of several words already in the prompt (any case, any punctuation) is not added again
    again = [a if a != "a red star with stripes" else "a red star with stripes, ZQ wv" for a in args]
    assert main(again) == 0
    assert read_parameters(out)["prompt"] == "a red star with stripes, ZQ wv, ring"
