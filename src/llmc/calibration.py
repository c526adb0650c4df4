"""Calibration and evaluation text: dataset -> rows -> token ids -> seeded token windows.

Rows follow the Hugging Face hub's wikitext rows (see `shared/data/README.md`): one line of a
file is one row; a blank or whitespace-only line is the empty row `""`; every other line keeps
its trailing `"\\n"`. Offline files live in `data_dir()` (`LLMC_DATA_DIR`, else the user
cache directory, else a source checkout's `../shared/data`); online, the same splits come from
the hub through `datasets`.

Calibration windows follow GPTQ (Frantar et al., 2022): the rows are joined with `"\\n\\n"`,
tokenized once, and `samples` window starts are drawn from a seeded `torch.Generator`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmc.registry import register_section

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "LLMC_DATA_DIR"
HELDOUT_SEED_OFFSET = 1_000_003
"""Held-out windows use the generator seeded with `seed + HELDOUT_SEED_OFFSET`."""

_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_WIKITEXT_HUB_SPLITS = ("train", "validation", "test")
# name -> (hub config of the "wikitext" dataset, {split: file relative to data_dir()})
_WIKITEXT = {
    "wikitext2": (
        "wikitext-2-v1",
        {"validation": "wikitext-2-v1/wiki.valid.tokens", "test": "wikitext-2-v1/wiki.test.tokens"},
    ),
    "wikitext2-raw": ("wikitext-2-raw-v1", {"test": "wikitext-2-raw-v1/wiki.test.raw"}),
}
_C4_REPO = "allenai/c4"
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


def data_dir() -> Path | None:
    """The offline data directory: `$LLMC_DATA_DIR` if set, else the first existing of the
    user cache directory (`$XDG_CACHE_HOME/llmc/data`, default `~/.cache/llmc/data`) and, in a
    source checkout, the `shared/data` folder beside it; None when neither exists."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    for candidate in _default_data_dirs():
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _default_data_dirs() -> list[Path]:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    candidates = [cache / "llmc" / "data"]
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():  # a source checkout, not an installed wheel
            candidates.append(parent / ".." / "shared" / "data")
            break
    return candidates


def rows_from_lines(text: str) -> list[str]:
    """Split file text into hub-style rows: one line per row, blank lines as `""`, other lines
    keep their trailing `"\\n"` (a last line without one is kept as it is)."""
    pieces = text.split("\n")
    last = pieces.pop()  # "" when the text ends with a newline
    rows = [piece + "\n" if piece.strip() else "" for piece in pieces]
    if last.strip():
        rows.append(last)
    return rows


def _hub_unavailable_reason() -> str | None:
    """Why the hub cannot be used (an offline env var, no `datasets`), or None."""
    for name in _OFFLINE_ENVS:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name} is set"
    if importlib.util.find_spec("datasets") is None:
        return "the `datasets` package is not installed"
    return None


def _load_hub(*args: Any, what: str, hint: str, **kwargs: Any) -> Any:
    """`datasets.load_dataset(*args, **kwargs)`, failures turned into a ValueError with `hint`."""
    reason = _hub_unavailable_reason()
    if reason is not None:
        raise ValueError(
            f"cannot load {what} from the Hugging Face hub: {reason}. {hint} To use the hub, "
            "`pip install datasets`, allow network access and unset HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE."
        )
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # datasets raises many types (network, missing repo, bad split)
        raise ValueError(
            f"cannot load {what} from the Hugging Face hub ({type(err).__name__}: {err}). {hint}"
        ) from err


def _wikitext_rows(name: str, split: str) -> list[str]:
    hub_config, files = _WIKITEXT[name]
    if split not in _WIKITEXT_HUB_SPLITS:
        raise ValueError(
            f"dataset {name!r} has no split {split!r}; its splits are "
            f"{list(_WIKITEXT_HUB_SPLITS)} (offline: {list(files)})"
        )
    root = data_dir()
    if split in files and root is not None:
        path = root / files[split]
        if path.is_file():
            return rows_from_lines(path.read_bytes().decode("utf-8"))
        where = f"looked for {path}"
    elif split in files:
        where = f"no data directory found (looked at {[str(p) for p in _default_data_dirs()]})"
    else:
        where = f"offline files exist only for splits {list(files)}"
    logger.info("%s split %s not found offline (%s); trying the hub", name, split, where)
    hint = (
        f"Offline, {name} has splits {list(files)} ({where}); set {DATA_DIR_ENV} to the "
        f"directory holding {files.get(split, 'the wikitext files')}."
    )
    ds = _load_hub("wikitext", hub_config, split=split, what=f"{name} split {split!r}", hint=hint)
    return list(ds["text"])


def _c4_rows(split: str) -> list[str]:
    if split not in _C4_FILES:
        raise ValueError(f"dataset 'c4' has no split {split!r}; choose one of {list(_C4_FILES)}")
    hint = (
        "c4 is only available from the hub; offline, calibrate on 'wikitext2' or on a local "
        ".jsonl file with a 'text' field."
    )
    ds = _load_hub(
        _C4_REPO,
        data_files={split: _C4_FILES[split]},
        split=split,
        what=f"c4 split {split!r} ({_C4_REPO}, {_C4_FILES[split]})",
        hint=hint,
    )
    return list(ds["text"])


def _jsonl_rows(path: Path, text_column: str) -> list[str]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({err}); write one JSON "
                                 "object per line") from err
            if not isinstance(record, dict) or text_column not in record:
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{lineno} has no field {text_column!r} (has {keys}); "
                                 "set text_column to the field that holds the text")
            rows.append(str(record[text_column]))
    return rows


def load_rows(dataset: str, split: str, *, text_column: str = "text") -> list[str]:
    """Rows of text, exactly as the hub gives them.

    `dataset` is `wikitext2` (the `wikitext-2-v1` splits), `wikitext2-raw` (`wikitext-2-raw-v1`),
    `c4` (the first `en` shard of `allenai/c4`, hub only), a local `.txt` file (rows = lines) or
    `.jsonl` file (field `text_column`; both ignore `split`), or any HF dataset id. Offline files
    are read first; a split the source lacks is refused, never substituted.
    """
    if dataset in _WIKITEXT:
        return _wikitext_rows(dataset, split)
    if dataset == "c4":
        return _c4_rows(split)
    path = Path(dataset).expanduser()
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise ValueError(f"text file {path} does not exist; pass the path of an existing "
                             ".txt or .jsonl file")
        if path.suffix == ".jsonl":
            return _jsonl_rows(path, text_column)
        return rows_from_lines(path.read_bytes().decode("utf-8").replace("\r\n", "\n"))
    hint = (f"Built-in names are {[*_WIKITEXT, 'c4']}; local files must end in .txt or .jsonl.")
    ds = _load_hub(dataset, split=split, what=f"dataset {dataset!r} split {split!r}", hint=hint)
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {dataset!r} has no column {text_column!r}; its columns are "
                         f"{ds.column_names}: set text_column to one of them")
    return list(ds[text_column])


def joined_text(rows: list[str]) -> str:
    """The rows joined with `"\\n\\n"`, as in the GPTQ perplexity and calibration protocol."""
    return "\n\n".join(rows)


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize `text` once, without truncation, adding only the tokenizer's default special
    tokens. Returns a LongTensor of shape [1, numel]."""
    # verbose=False silences the "longer than the maximum sequence length" warning: the text is
    # cut into windows afterwards, never fed whole to the model.
    encoded = tokenizer(text, return_tensors="pt", truncation=False, verbose=False)
    return torch.as_tensor(encoded["input_ids"], dtype=torch.long).reshape(1, -1)


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text to calibrate on and how to cut it: `samples` windows of `seqlen` tokens whose
    starts are drawn from `torch.Generator().manual_seed(seed)`."""

    dataset: str = "wikitext2"
    split: str = "validation"
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    text_column: str = "text"

    def __post_init__(self) -> None:
        for name in ("dataset", "split", "text_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"calibration {name} must be a non-empty string, got {value!r}")
        for name, least in (("samples", 1), ("seqlen", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(
                    f"calibration {name} must be an integer >= {least}, got {value!r}; "
                    f"set {name} to e.g. {getattr(CalibrationConfig, name)}"
                )


class TokenSource:
    """A tokenizer plus a cache of the token ids of the texts it has tokenized, keyed by
    (dataset, split, text_column). Hold one to cut calibration and held-out windows from the
    same text without tokenizing it twice."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._ids: dict[tuple[str, str, str], torch.Tensor] = {}

    def token_ids(self, dataset: str, split: str, text_column: str = "text") -> torch.Tensor:
        """The joined rows of `dataset`/`split`, tokenized once: LongTensor [1, numel]."""
        key = (dataset, split, text_column)
        if key not in self._ids:
            rows = load_rows(dataset, split, text_column=text_column)
            self._ids[key] = tokenize_text(self.tokenizer, joined_text(rows))
        return self._ids[key]


def _stream(tokenizer: Any, config: CalibrationConfig) -> torch.Tensor:
    source = tokenizer if isinstance(tokenizer, TokenSource) else TokenSource(tokenizer)
    return source.token_ids(config.dataset, config.split, config.text_column)[0]


def _calibration_starts(numel: int, config: CalibrationConfig, holdout: int) -> torch.Tensor:
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
        raise ValueError(f"holdout must be an integer >= 0 tokens, got {holdout!r}")
    high = numel - holdout - config.seqlen
    if high < 1:
        raise ValueError(
            f"{config.dataset} split {config.split!r} has {numel} tokens; calibration windows "
            f"need at least seqlen + 1 = {config.seqlen + 1} (+ holdout {holdout}): lower seqlen "
            "or use a longer text"
        )
    gen = torch.Generator().manual_seed(config.seed)
    return torch.randint(0, high, (config.samples,), generator=gen)


def _gather(ids: torch.Tensor, starts: torch.Tensor, seqlen: int) -> torch.Tensor:
    return ids[starts[:, None] + torch.arange(seqlen)]  # (n, seqlen)


def calibration_windows(
    tokenizer: Any, config: CalibrationConfig, *, holdout: int = 0
) -> torch.Tensor:
    """Seeded calibration windows: LongTensor [samples, seqlen].

    Starts are drawn independently (with replacement) from `[0, numel - holdout - seqlen)` with
    `torch.Generator().manual_seed(config.seed)`; the last `holdout` tokens of the text are never
    used. `tokenizer` may be a `TokenSource` to reuse its cached token ids.
    """
    ids = _stream(tokenizer, config)
    return _gather(ids, _calibration_starts(ids.numel(), config, holdout), config.seqlen)


def heldout_windows(
    tokenizer: Any, config: CalibrationConfig, count: int, *, holdout: int = 0
) -> torch.Tensor:
    """`count` windows of the calibration text that overlap none of the calibration windows
    (`calibration_windows(tokenizer, config, holdout=holdout)`): LongTensor [count, seqlen].

    For tuning hyperparameters without touching the test split. Starts are drawn uniformly from
    the starts whose window is disjoint from every calibration window, with the generator seeded
    `config.seed + HELDOUT_SEED_OFFSET` (the same law as drawing and skipping overlapping draws).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"held-out window count must be an integer >= 1, got {count!r}")
    ids = _stream(tokenizer, config)
    seqlen, n_starts = config.seqlen, ids.numel() - config.seqlen
    calib = _calibration_starts(ids.numel(), config, holdout)
    # Start s overlaps calibration start c iff c - seqlen < s < c + seqlen: mark those ranges.
    edges = torch.zeros(n_starts + 1, dtype=torch.long)
    edges.index_add_(0, (calib - seqlen + 1).clamp(min=0), torch.ones_like(calib))
    edges.index_add_(0, (calib + seqlen).clamp(max=n_starts), -torch.ones_like(calib))
    allowed = (edges.cumsum(0)[:n_starts] == 0).nonzero().flatten()
    if allowed.numel() == 0:
        raise ValueError(
            f"no window of {seqlen} tokens in {config.dataset} split {config.split!r} "
            f"({ids.numel()} tokens) is disjoint from the {config.samples} calibration windows; "
            "lower samples or seqlen, or calibrate on a longer text"
        )
    gen = torch.Generator().manual_seed(config.seed + HELDOUT_SEED_OFFSET)
    starts = allowed[torch.randint(0, allowed.numel(), (count,), generator=gen)]
    return _gather(ids, starts, seqlen)


register_section("calibration", CalibrationConfig)
