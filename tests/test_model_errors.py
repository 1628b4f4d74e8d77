"""Every bad model reference gives a one-line error naming the problem and the fix, exit code 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from studio.cli import main
from studio.models import loading


def _run(model: str, tmp_path: Path, capsys) -> str:
    capsys.readouterr()
    code = main(["generate", "--model", model, "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()
    return err


def test_unknown_name(tmp_path: Path, capsys) -> None:
    assert "unknown model 'nonsense'" in _run("nonsense", tmp_path, capsys)


def test_missing_path(tmp_path: Path, capsys) -> None:
    assert "does not exist" in _run(str(tmp_path / "nowhere" / "model.safetensors"), tmp_path, capsys)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_refused_with_conversion_hint(suffix: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    err = _run(str(path), tmp_path, capsys)
    assert "pickle" in err and "safetensors" in err and "weights_only=True" in err


def test_damaged_safetensors_in_folder(tiny_dirs: dict, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_dirs["sd1"], folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = _run(str(folder), tmp_path, capsys)
    assert str(weights) in err and "damaged" in err


def test_non_model_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "photos").mkdir()
    assert "not a diffusers model folder" in _run(str(tmp_path / "photos"), tmp_path, capsys)


def test_pickle_only_folder(tiny_dirs: dict, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dirs["sd1"], folder)
    for path in folder.rglob("*.safetensors"):
        path.rename(path.with_suffix(".bin"))
    assert "pickle" in _run(str(folder), tmp_path, capsys)


def test_uncached_hub_id_offline(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    err = _run("someone/some-model", tmp_path, capsys)
    assert "not in the local Hugging Face cache" in err and "offline" in err


def test_embedded_model_not_built(tmp_path: Path, capsys, monkeypatch) -> None:
    from studio.generate import cached_pipeline

    monkeypatch.setattr(loading, "ASSETS", tmp_path / "assets")
    cached_pipeline.cache_clear()  # another test in this process may have loaded the real one
    assert "not built yet" in _run("studio-tiny", tmp_path, capsys)


def test_network_is_blocked_in_tests() -> None:
    import socket

    with pytest.raises(OSError, match="network"):
        socket.create_connection(("203.0.113.1", 80), timeout=1)
