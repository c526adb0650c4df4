"""Tests for llmc.calibration: rows as the hub gives them, seeded and held-out windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmc.calibration import (
    CalibrationConfig,
    TokenSource,
    calibration_windows,
    data_dir,
    heldout_windows,
    joined_text,
    load_rows,
    tokenize_text,
)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


class ByteTokenizer:
    """Byte-level stand-in for a HF tokenizer: ids = UTF-8 bytes, no special tokens."""

    name_or_path = "bytes"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str, **kwargs: object) -> dict[str, torch.Tensor]:
        self.calls += 1
        assert kwargs.get("truncation") is False
        return {"input_ids": torch.tensor([list(text.encode())], dtype=torch.long)}


class PositionTokenizer(ByteTokenizer):
    """ids = character positions, so a window's first id is its start in the stream."""

    def __call__(self, text: str, **kwargs: object) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"input_ids": torch.arange(len(text))[None]}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network; the data dir is the shared one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if SHARED_DATA.is_dir():
        monkeypatch.setenv("LLMC_DATA_DIR", str(SHARED_DATA.resolve()))


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    words = " ".join(f"word{i}" for i in range(400))
    path.write_text(f" \n = Title = \n\n{words}\n  \nlast line\n", encoding="utf-8")
    return path


def test_data_dir_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMC_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path


def test_data_dir_default_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   wikitext) -> None:
    monkeypatch.delenv("LLMC_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # ../shared/data from here does not exist: use the project root
    found = data_dir()
    assert found is not None and (found / "wikitext-2-v1" / "wiki.valid.tokens").is_file()


def test_raw_test_rows_match_the_hub(wikitext) -> None:
    rows = load_rows("wikitext2-raw", "test")
    assert len(rows) == 4358
    assert sum(1 for row in rows if row) == 2891
    assert all(row == "" or row.endswith("\n") for row in rows)
    assert joined_text(rows).startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")


def test_tokenized_splits_row_counts(wikitext) -> None:
    assert len(load_rows("wikitext2", "validation")) == 3760
    assert len(load_rows("wikitext2", "test")) == 4358


@pytest.mark.parametrize(("dataset", "split"), [("wikitext2", "train"), ("wikitext2-raw", "train")])
def test_split_missing_offline_names_available_splits(dataset: str, split: str) -> None:
    with pytest.raises(ValueError, match=r"has splits \[.*'test'") as info:
        load_rows(dataset, split)
    assert "HF_HUB_OFFLINE" in str(info.value) and "LLMC_DATA_DIR" in str(info.value)


def test_unknown_split_is_refused_not_substituted() -> None:
    with pytest.raises(ValueError, match=r"no split 'dev'.*\['train', 'validation', 'test'\]"):
        load_rows("wikitext2", "dev")


def test_missing_data_dir_says_where_it_looked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LLMC_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="wiki.test.raw"):
        load_rows("wikitext2-raw", "test")


def test_c4_offline_error() -> None:
    with pytest.raises(ValueError, match="c4 is only available from the hub"):
        load_rows("c4", "validation")
    with pytest.raises(ValueError, match="no split 'test'"):
        load_rows("c4", "test")


def test_hub_dataset_offline_error() -> None:
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        load_rows("someone/some-dataset", "train")


def test_txt_rows(text_file: Path) -> None:
    rows = load_rows(str(text_file), "ignored")
    assert rows[0] == "" and rows[1] == " = Title = \n" and rows[2] == ""
    assert rows[-2:] == ["", "last line\n"]
    assert len(rows) == 6


def test_jsonl_rows(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    records = [{"text": "a b c", "id": 1}, {"text": "d\ne", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    assert load_rows(str(path), "train") == ["a b c", "d\ne"]
    path2 = tmp_path / "other.jsonl"
    path2.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    assert load_rows(str(path2), "train", text_column="body") == ["x"]
    with pytest.raises(ValueError, match=r"no field 'text' \(has \['body'\]\)"):
        load_rows(str(path2), "train")


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(str(tmp_path / "nope.txt"), "train")


def test_tokenize_text_shape() -> None:
    ids = tokenize_text(ByteTokenizer(), "héllo")
    assert ids.dtype == torch.long and ids.shape == (1, 6)


@pytest.mark.parametrize(
    "kwargs", [{"samples": 0}, {"seqlen": 0}, {"seed": -1}, {"samples": 1.5}, {"dataset": ""}]
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        CalibrationConfig(**kwargs)


def test_windows_are_seeded(text_file: Path) -> None:
    source = TokenSource(ByteTokenizer())
    config = CalibrationConfig(dataset=str(text_file), samples=8, seqlen=32, seed=0)
    first = calibration_windows(source, config)
    assert first.shape == (8, 32) and first.dtype == torch.long
    assert torch.equal(first, calibration_windows(source, config))
    other = calibration_windows(source, CalibrationConfig(str(text_file), samples=8, seqlen=32,
                                                          seed=1))
    assert not torch.equal(first, other)
    assert source.tokenizer.calls == 1  # the cache held by the TokenSource
    # The windows are contiguous slices of the token stream at the documented starts.
    ids = source.token_ids(str(text_file), "validation")[0]
    starts = torch.randint(0, ids.numel() - 32, (8,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, torch.stack([ids[s : s + 32] for s in starts.tolist()]))


def test_windows_from_plain_tokenizer_on_wikitext(wikitext) -> None:
    config = CalibrationConfig(samples=4, seqlen=64)
    windows = calibration_windows(ByteTokenizer(), config)
    text = joined_text(load_rows("wikitext2", "validation")).encode()
    for window in windows:
        assert bytes(window.tolist()) in text


def test_holdout_keeps_the_tail_unused(text_file: Path) -> None:
    source = TokenSource(PositionTokenizer())
    numel = source.token_ids(str(text_file), "validation").shape[1]
    config = CalibrationConfig(dataset=str(text_file), samples=256, seqlen=16)
    windows = calibration_windows(source, config, holdout=numel - 40)
    assert int(windows.max()) < 40
    assert int(calibration_windows(source, config).max()) >= 40


def test_text_too_short(text_file: Path) -> None:
    config = CalibrationConfig(dataset=str(text_file), samples=1, seqlen=100_000)
    with pytest.raises(ValueError, match="seqlen"):
        calibration_windows(ByteTokenizer(), config)


def test_heldout_windows_are_disjoint(text_file: Path) -> None:
    source = TokenSource(PositionTokenizer())
    config = CalibrationConfig(dataset=str(text_file), samples=16, seqlen=32, seed=3)
    calib_starts = calibration_windows(source, config)[:, 0]
    held = heldout_windows(source, config, 40)
    assert held.shape == (40, 32)
    assert torch.equal(held, heldout_windows(source, config, 40))
    assert torch.equal(held[:, 1:] - held[:, :-1], torch.ones(40, 31, dtype=torch.long))
    gaps = (held[:, :1] - calib_starts[None, :]).abs()  # (held, calib)
    assert bool((gaps >= 32).all())
    other = heldout_windows(source, CalibrationConfig(str(text_file), samples=16, seqlen=32,
                                                      seed=4), 40)
    assert not torch.equal(held, other)


def test_heldout_impossible_when_calibration_covers_the_text(text_file: Path) -> None:
    config = CalibrationConfig(dataset=str(text_file), samples=2000, seqlen=64)
    with pytest.raises(ValueError, match="disjoint"):
        heldout_windows(ByteTokenizer(), config, 1)
