"""Library folder/index behaviour, safety, concurrency, tools (merge/resize/edit), compatibility and the CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest
import torch
from library_helpers import make_kohya
from tiny_models import BUILDERS

from studio.cli import main
from studio.errors import StudioError
from studio.library import (
    AdapterMeta,
    CheckpointMismatchWarning,
    Library,
    delta_weight,
    edit,
    import_adapter,
    load_adapters,
    merge,
    resize,
)


def _tiny(seed: int, rank: int = 2) -> tuple[dict, AdapterMeta]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "unet.a.lora_A.weight": torch.randn(rank, 6, generator=g),
        "unet.a.lora_B.weight": torch.randn(5, rank, generator=g),
        "unet.c.lora_A.weight": torch.randn(rank, 3, 3, 3, generator=g),
        "unet.c.lora_B.weight": torch.randn(4, rank, 1, 1, generator=g),
    }
    meta = AdapterMeta(
        kind="style",
        tags=["t"],
        trigger_words=["zq"],
        ranks={"unet.a": rank, "unet.c": rank},
        alphas={"unet.a": 1.0, "unet.c": 3.0},
    )
    return sd, meta


def test_add_list_get_search_remove() -> None:
    lib = Library()
    sd, meta = _tiny(0)
    lib.add("one", sd, meta, train_config={"seed": 0}, samples={"seed0000.png": b"\x89PNG"})
    meta2 = AdapterMeta(**{**meta.__dict__, "kind": "subject", "tags": ["dog"], "description": "a corgi",
                            "method": "sara"})  # fmt: skip
    lib.add("two", sd, meta2)
    assert [e.name for e in lib.list()] == ["one", "two"]
    assert [e.name for e in lib.search(kind="subject")] == ["two"]
    assert [e.name for e in lib.search(method="sara")] == ["two"] and lib.search(method="kronecker") == []
    assert [e.name for e in lib.search(tag="dog")] == ["two"]
    assert [e.name for e in lib.search("corgi")] == ["two"]
    assert [e.name for e in lib.search(name="on")] == ["one"]
    assert lib.get("one").samples[0].name == "seed0000.png"
    for key, t in sd.items():
        assert torch.equal(lib.get("one").state_dict()[key], t)
    with pytest.raises(StudioError, match="already exists"):
        lib.add("one", sd, meta)
    lib.remove("one")
    assert [e.name for e in lib.list()] == ["two"]
    (lib.root / "index.jsonl").write_text("garbage\n")
    assert [e.name for e in lib.list()] == ["two"]  # a damaged index is rebuilt


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", "UPPER", ".hidden", "x" * 65, "dot.name"])
def test_names_are_slugs(bad: str) -> None:
    sd, meta = _tiny(0)
    with pytest.raises(StudioError, match="slug"):
        Library().add(bad, sd, meta)


def test_damaged_and_foreign_files_are_named_and_the_rest_lists(tmp_path) -> None:
    lib = Library()
    sd, meta = _tiny(0)
    lib.add("good", sd, meta)
    lib.add("broken", sd, meta)
    (lib.root / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (lib.root / "foreign").mkdir()
    (lib.root / "foreign" / "adapter_config.json").write_text('{"r": 4}')
    (lib.root / "foreign" / "adapter_model.safetensors").write_bytes(b"")
    assert [e.name for e in lib.list()] == ["good"]
    assert "broken/adapter_model.safetensors" in lib.problems["broken"]
    assert "studio" in lib.problems["foreign"]
    with pytest.raises(StudioError, match="broken/adapter_model.safetensors"):
        lib.get("broken").state_dict()
    pickle = tmp_path / "x.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(StudioError, match="pickle"):
        import_adapter(pickle)
    notlora = tmp_path / "full.safetensors"
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.x.weight": torch.zeros(2)}, str(notlora))
    with pytest.raises(StudioError, match="not a LoRA"):
        import_adapter(notlora)
    with pytest.raises(StudioError, match="no adapter named"):
        lib.get("missing")


def _writer(root: str, name: str, barrier, seed: int) -> None:
    barrier.wait()
    sd, meta = _tiny(seed)
    Library(root).add(name, sd, meta)


def test_two_processes_add_at_the_same_moment(tmp_path) -> None:
    ctx = mp.get_context("fork")
    for rep in range(20):
        root = str(tmp_path / f"lib{rep}")
        barrier = ctx.Barrier(2)
        procs = [ctx.Process(target=_writer, args=(root, n, barrier, i)) for i, n in enumerate(("left", "right"))]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        rows = [json.loads(line) for line in open(os.path.join(root, "index.jsonl"))]
        assert sorted(r["name"] for r in rows) == ["left", "right"]
        assert sorted(e.name for e in Library(root).list()) == ["left", "right"]


def test_merge_resize_edit() -> None:
    lib = Library()
    sd_a, meta_a = _tiny(1)
    sd_b, meta_b = _tiny(2, rank=3)
    meta_b.ranks = {"unet.a": 3, "unet.c": 3}
    lib.add("a", sd_a, meta_a)
    lib.add("b", sd_b, meta_b)
    want = {m: 0.7 * delta_weight(meta_a, sd_a, m) - 0.4 * delta_weight(meta_b, sd_b, m) for m in ("unet.a", "unet.c")}
    for combination, rank in (("cat", None), ("svd", 5)):
        entry = merge([("a", 0.7), ("b", -0.4)], f"m-{combination}", combination=combination, rank=rank)
        for m, d in want.items():
            assert (delta_weight(entry.meta, entry.state_dict(), m) - d).abs().max() < 1e-5
    errors = resize("m-cat", 1, new_name="small")
    for m, d in want.items():
        s = torch.linalg.svdvals(d.double())
        assert errors[m] == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4)  # the optimal rank-1 error
    entry = edit("small", trigger_words=["new"], add_tags=["x"], kind="subject", new_name="renamed")
    assert entry.meta.trigger_words == ["new"] and "x" in entry.meta.tags and entry.meta.kind == "subject"
    assert "small" not in lib and "renamed" in lib
    with pytest.raises(StudioError, match="kind"):
        edit("renamed", kind="weird")


def test_compatibility_levels(tmp_path) -> None:
    sd1, sdxl, other = BUILDERS["sd1"](), BUILDERS["sdxl"](), BUILDERS["sd1"]()
    make_kohya(sd1, tmp_path / "k.safetensors", "sd1")
    import_adapter(tmp_path / "k.safetensors", name="fit", pipe=sd1)
    with pytest.raises(StudioError, match="module unet.down_blocks.0.attentions.0"):
        load_adapters(sdxl, ["fit"])
    with torch.no_grad():
        other.unet.conv_in.weight.add_(0.01)  # another "checkpoint" of the same architecture
    with pytest.warns(CheckpointMismatchWarning):
        load_adapters(other, ["fit"])
    # the Library tab's badges say the same without loading anything: from the stored fingerprint, or (an import
    # without base information) from the tensors' shapes
    from studio.library.compat import base_signature, fit

    import_adapter(tmp_path / "k.safetensors", name="bare")
    signatures = {name: base_signature(p) for name, p in (("sd1", sd1), ("sdxl", sdxl), ("other", other))}
    for name in ("fit", "bare"):
        entry = Library().get(name)
        assert fit(entry, signatures["sd1"]).level == "fits"
        refused = fit(entry, signatures["sdxl"])
        assert refused.level == "no" and refused.badge == "✗ does not fit"
    assert fit(Library().get("fit"), signatures["other"]).level == "other-checkpoint"
    assert fit(Library().get("bare"), signatures["other"]).level == "fits"  # no checkpoint recorded to differ from
    assert "module unet.down_blocks.0.attentions.0" in fit(Library().get("bare"), signatures["sdxl"]).reason


def test_cli(tmp_path, capsys) -> None:
    pipe = BUILDERS["sd1"]()
    make_kohya(pipe, tmp_path / "k.safetensors", "sd1", metadata={"ss_output_name": "My LoRA"})
    assert main(["library", "import", str(tmp_path / "k.safetensors"), "--trigger", "zq", "--tags", "a,b"]) == 0
    capsys.readouterr()
    assert main(["library", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["name"] == "my-lora" and listed[0]["trigger_words"] == ["zq"]
    assert main(["library", "list", "--method", "imported", "--json"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)] == ["my-lora"]
    assert main(["library", "list", "--method", "sara", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["library", "edit", "my-lora", "--kind", "style", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "style"
    assert main(["library", "merge", "my-lora:0.5,my-lora:0.5", "--name", "m", "--combination", "cat"]) == 0
    assert main(["library", "export", "my-lora", "--format", "kohya", "--out", str(tmp_path / "o.safetensors")]) == 0
    assert main(["library", "show", "nope"]) == 2
    assert main(["library", "import", str(tmp_path / "k.safetensors"), "--name", "../x"]) == 2
    assert main(["library", "reindex"]) == 0
    assert main(["library", "remove", "my-lora"]) == 0
