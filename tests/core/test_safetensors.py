"""llmc's safetensors reader and writer against the safetensors package."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmc.core.safetensors import SafetensorsFile, concatenate, write_file


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g)
    return {"a": base, "b": base.to(torch.bfloat16), "c": torch.arange(11, dtype=torch.int32),
            "d": torch.randn(3, generator=g).half(), "e": torch.tensor([True, False]),
            "f": torch.zeros(0, 4), "g": base[:2],  # shares storage with "a"
            "h": torch.randint(0, 255, (830, 545), generator=g, dtype=torch.uint8)}


def test_written_files_load_with_the_package(tmp_path):
    t = sample()
    write_file(tmp_path / "x.safetensors", t, metadata={"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k


def test_reads_what_the_package_writes(tmp_path):
    t = {k: v.clone() for k, v in sample().items()}
    save_file(t, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    for k in t:
        got = f.read(k)
        assert got.dtype == t[k].dtype and got.shape == t[k].shape and torch.equal(got, t[k]), k
        assert f.shape(k) == tuple(t[k].shape) and f.dtype(k) == t[k].dtype


def test_concatenate_joins_files(tmp_path):
    t = sample()
    write_file(tmp_path / "1.safetensors", {k: t[k] for k in "abc"})
    write_file(tmp_path / "2.safetensors", {k: t[k] for k in "defgh"})
    files = [SafetensorsFile(tmp_path / f"{i}.safetensors") for i in (1, 2)]
    concatenate(tmp_path / "all.safetensors", files, metadata={"format": "pt"})
    back = load_file(str(tmp_path / "all.safetensors"))
    assert all(torch.equal(back[k], t[k]) for k in t)
    with pytest.raises(ValueError, match="in two of the files"):
        concatenate(tmp_path / "dup.safetensors", [files[0], files[0]])


def test_truncated_or_corrupt_files_are_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    write_file(p, sample())
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsFile(p)
    p.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsFile(p)
    p.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match="not valid JSON"):
        SafetensorsFile(p)
    with pytest.raises(ValueError, match="does not exist"):
        SafetensorsFile(tmp_path / "missing.safetensors")


def test_mapped_reads_equal_reads_and_never_write_the_file(tmp_path):
    t = sample()
    path = tmp_path / "x.safetensors"
    write_file(path, t)
    before = path.read_bytes()
    f = SafetensorsFile(path)
    for k in t:
        m = f.map(k)
        assert m.dtype == t[k].dtype and torch.equal(m, f.read(k)), k
        if m.numel() and m.dtype != torch.bool:
            m.zero_()  # private: the file keeps its bytes
        f.drop_cache(k)
    assert path.read_bytes() == before
    assert torch.equal(f.map("h"), t["h"])  # a new map sees the file, not the earlier writes


def test_durable_writes_read_back(tmp_path):
    t = sample()
    write_file(tmp_path / "x.safetensors", t, durable=True)
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert all(torch.equal(f.read(k), t[k]) for k in t)
