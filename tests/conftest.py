"""Suite-wide set-up: offline, sockets blocked except loopback, GPU tests skipped without CUDA, tiny models."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["DO_NOT_TRACK"] = "1"
# As the CLI on busy cores (studio.openmp): OpenMP threads sleep at barriers, set before torch loads. Tests that
# keep torch's default threads on cores shared with other workers otherwise wait on each other's time slices.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).parent))

# The web UI's tests need gradio; an install of the core stack alone (a GPU box, say) leaves them out, and says so.
NO_GRADIO = importlib.util.find_spec("gradio") is None
collect_ignore_glob = ["ui/*", "test_app.py"] if NO_GRADIO else []


def pytest_report_header(config: pytest.Config) -> str | None:
    return "gradio is not installed: tests/ui and tests/test_app.py are not collected" if NO_GRADIO else None


def _is_loopback(address: object) -> bool:
    if isinstance(address, tuple) and address:
        host = address[0]
    elif isinstance(address, str | bytes):  # AF_UNIX paths
        return True
    else:
        return False
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self: socket.socket, address: object) -> None:
    if not _is_loopback(address):
        raise OSError(f"tests must not touch the network (connect to {address!r} blocked)")
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: object) -> int:
    if not _is_loopback(address):
        raise OSError(f"tests must not touch the network (connect to {address!r} blocked)")
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: set RUN_SLOW=1")
    # The heavy tests first (a stable sort), and idle workers take tests queued for busy ones (`--dist worksteal`):
    # the suite ends on short tests. Measured on 2 cores: the workers ended 4 s apart, against 30 s with the heavy
    # tests where they fall and `--dist load`.
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
    for item in items:
        if ("gpu" in item.keywords or "triton" in item.keywords) and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and os.environ.get("RUN_SLOW") != "1":
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own library and cache, so nothing leaks between tests or into the checkout."""
    monkeypatch.setenv("STUDIO_LIBRARY", str(tmp_path_factory.mktemp("library")))
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    from studio.library.load import forget_warm

    forget_warm()  # adapters kept warm in cached pipelines came from this test's library


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (the machine is shared); directories opt in with an autouse fixture."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SD1, SD2 and SDXL diffusers folders, written once per session."""
    from tiny_models import KINDS, save_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="session")
def tiny_single_file(tiny_dirs: dict[str, Path]) -> Path:
    """The tiny SD1 model written as one original-layout (LDM / A1111) `.safetensors` checkpoint."""
    from studio.models import load_pipeline
    from studio.models.single_file import save_single_file

    out = tiny_dirs["sd1"].parent / "sd1-original.safetensors"
    if not out.exists():
        save_single_file(load_pipeline(str(tiny_dirs["sd1"])), out)
    return out
