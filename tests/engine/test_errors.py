"""Bad input to a streaming run: a one-line error before any work, nothing left behind."""

from __future__ import annotations

import json

import pytest
from checkpoints import write_gguf, write_sharded
from click.testing import CliRunner

from llmc.cli import cli


@pytest.fixture
def src(tmp_path):
    return write_sharded(tmp_path / "m", blocks=2)


def refused(tmp_path, *args) -> str:
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["quantize", *map(str, args), "--method", "rtn",
                                   "--group-size", "32", "-o", str(out), "--quiet"])
    assert res.exit_code == 1, res.output
    assert not out.exists() and not list(tmp_path.glob(".o*")), "work began"
    lines = [x for x in res.output.strip().splitlines() if x.startswith("Error")]
    assert len(lines) == 1, res.output
    return lines[0]


def test_cuda_without_cuda(src, tmp_path):
    msg = refused(tmp_path, src, "--device", "cuda")
    assert "no CUDA device is available" in msg and "--device cpu" in msg
    assert "not one of" in refused(tmp_path, src, "--device", "tpu")


def test_shard_missing(src, tmp_path):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (src / shard).unlink()
    msg = refused(tmp_path, src)
    assert shard in msg and "named in model.safetensors.index.json but missing" in msg


def test_truncated_shard(src, tmp_path):
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    msg = refused(tmp_path, src)
    assert shard.name in msg and "truncated" in msg


def test_truncated_gguf(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", blocks=2)
    path.write_bytes(path.read_bytes()[:-4096])
    assert "truncated" in refused(tmp_path, path)


def test_no_safetensors(tmp_path):
    (tmp_path / "m").mkdir()
    src = write_sharded(tmp_path / "m", blocks=2)
    for f in src.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    (src / "model.safetensors.index.json").unlink()
    assert "never unpickles" in refused(tmp_path, src)


def test_over_max_memory(src, tmp_path):
    msg = refused(tmp_path, src, "--max-memory", "64MiB")
    assert "GiB of RAM at its peak" in msg and "--max-memory allows 0.06 GiB" in msg
    assert "cannot read" in refused(tmp_path, src, "--max-memory", "lots")


def test_not_enough_disk(src, tmp_path, monkeypatch):
    import llmc.engine.plan as plan

    class Usage:
        free = 4096

    monkeypatch.setattr(plan.shutil, "disk_usage", lambda _p: Usage)
    assert "free some disk space" in refused(tmp_path, src)
