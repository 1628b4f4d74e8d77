"""NaN and infinity are refused in every numeric option, with the option named: CLI, JSON jobs, tags, Python configs.

`float("nan") > 1.0` is False, so before this check `studio generate --guidance nan` ran unguided and exited 0.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from composers.adapter_set import AdapterSet, parse_schedule
from composers.switch import SwitchConfig
from studio.batch import read_jobs
from studio.cli import main
from studio.cli.library import parse_sources
from studio.configs import base_type, finite
from studio.errors import StudioError
from studio.generate import GenerateConfig
from studio.prompt_tags import split_lora_tags
from trainers import METHODS, TrainConfig
from trainers.methods.full import FullConfig
from trainers.recipes.base import BaseTrainConfig


# Every config dataclass behind a flag, a JSON key or a form, with the values its required fields need.
CONFIGS = {
    GenerateConfig: {"prompt": "a red star"},
    TrainConfig: {"trigger": "sks", "name": "x", "world_emblem": 3},
    SwitchConfig: {},
    BaseTrainConfig: {},
    FullConfig: {},
    **{cls.config_cls: {} for cls in METHODS.values()},
}
BAD = (float("nan"), float("inf"), float("-inf"))


def _numeric_fields() -> list[tuple[type, str]]:
    out = []
    for cls in CONFIGS:
        hints = typing.get_type_hints(cls)
        out += [(cls, f.name) for f in dataclasses.fields(cls) if base_type(hints[f.name]) in (int, float)]
    return out


@pytest.mark.parametrize(("cls", "name"), _numeric_fields(), ids=lambda v: getattr(v, "__name__", v))
def test_every_numeric_config_field_refuses_nan_and_infinity(cls: type, name: str) -> None:
    flag = "--" + name.replace("_", "-")
    for bad in BAD:
        with pytest.raises(StudioError, match=rf"^{flag} must be a finite number"):
            cls(**{**CONFIGS[cls], name: bad})
        with pytest.raises(StudioError, match=rf"^{flag} must be a finite number"):
            cls(**{**CONFIGS[cls], name: str(bad)})  # as text, the way a form or a JSON string gives it


def test_counts_refuse_fractions_and_read_numbers_written_as_text() -> None:
    with pytest.raises(StudioError, match="--steps must be a whole number, got 2.5"):
        GenerateConfig(prompt="x", steps=2.5)
    config = GenerateConfig(prompt="x", steps="3", guidance="5.5", seed=7.0)
    assert (config.steps, config.guidance, config.seed) == (3, 5.5, 7) and isinstance(config.seed, int)
    assert GenerateConfig(prompt="x", guidance=7).guidance == 7  # an int guidance stays as given
    with pytest.raises(StudioError, match="--guidance must be a number, got 'lots'"):
        GenerateConfig(prompt="x", guidance="lots")
    with pytest.raises(StudioError, match="--steps must be a number"):
        GenerateConfig(prompt="x", steps=True)
    assert finite("1e3", "--steps", int) == 1000


def test_cli_refuses_nan_guidance_in_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "x.png"
    for argv in (["--guidance", "nan"], ["--guidance", "inf"], ["--steps", "nan"], ["--guidance-rescale", "nan"]):
        assert main(["generate", "--prompt", "a red star", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"error: {argv[0]} must be a finite number"), err
    assert not out.exists()
    assert main(["world", "train-clip", "--lr", "nan"]) == 2  # a flag outside the config dataclasses
    assert capsys.readouterr().err.strip() == "error: --lr must be a finite number (not nan or infinity), got nan"
    assert main(["train", "--method", "kronecker", "--trigger", "s", "--name", "x", "--world-emblem", "3",
                 "--factor", "inf"]) == 2  # a method's own option
    assert "--factor must be a finite number" in capsys.readouterr().err


def test_json_jobs_with_nan_name_the_line_and_the_option(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a"}) + "\n" + '{"prompt": "b", "guidance": NaN}\n')
    with pytest.raises(StudioError, match=r"jobs.jsonl:2: --guidance must be a finite number \(.*\), got nan"):
        read_jobs(jobs)
    jobs.write_text('{"prompt": "b", "steps": Infinity}\n')
    with pytest.raises(StudioError, match=r"jobs.jsonl:1: --steps must be a finite number \(.*\), got inf"):
        read_jobs(jobs)


def test_adapter_weights_refuse_nan_everywhere_they_are_typed() -> None:
    with pytest.raises(StudioError, match=r"bad weight in '<lora:corgi:nan>': the weight must be a finite number"):
        split_lora_tags("a dog <lora:corgi:nan>")
    with pytest.raises(StudioError, match=r"bad weight in 'corgi:inf': the weight must be a finite number"):
        AdapterSet.parse("corgi:inf")
    with pytest.raises(StudioError, match=r"weight of 'corgi' must be a finite number"):
        AdapterSet(["corgi"], [float("nan")])
    with pytest.raises(StudioError, match=r"bad weight in 'a:nan': the weight must be a finite number"):
        parse_sources("a:nan,b:0.5")
    with pytest.raises(StudioError, match="--schedule START must be a finite number"):
        parse_schedule("linear:nan:0")
    assert split_lora_tags("a dog <lora:corgi:0.5>")[1] == [("corgi", 0.5)]
