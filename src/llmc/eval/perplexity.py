"""Perplexity by the GPTQ / SparseGPT / AWQ protocol (see `shared/data/README.md`).

The text is tokenized once and cut into `numel // seqlen` non-overlapping windows (tail
dropped); the loss is the mean token cross-entropy of each window's shifted logits, averaged
over windows, and `ppl = exp(loss)`. Logits are computed from the last hidden state in chunks of
`chunk_size` positions in float32, so a 262k-vocabulary head never materialises
[seqlen, vocab] fp32 logits for a whole window.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmc.calibration import joined_text, load_rows, tokenize_text

logger = logging.getLogger(__name__)

_CHECK_TOKENS = 16  # positions used to check the chunked head against the model's own logits


def _softcap(model: nn.Module) -> float | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "final_logit_softcapping", None)


def _head_logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Float32 logits [..., vocab] of final hidden states [..., hidden]."""
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _split_head(model: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, nn.Module] | None:
    """(base model, output head) when `head(base(ids).last_hidden_state)` (softcapped if the
    config says so) reproduces the model's own logits on `probe` [1, t]; None otherwise, and then
    the caller uses the full logits."""
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(base, nn.Module) or not isinstance(head, nn.Module):
        return None
    # Models can scale logits in ways we do not know (logit_scale, logits_scaling, ...): check
    # on a short prefix that head(base(x)) is what the model itself returns.
    hidden = getattr(base(input_ids=probe), "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        return None
    got = _head_logits(head, hidden, _softcap(model))
    expected = model(input_ids=probe).logits.float()
    tol = 1e-3 * max(expected.abs().max().item(), 1.0)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=tol):
        logger.warning(
            "%s: head(model.model(x)) does not reproduce the model's logits; computing "
            "perplexity from full logits (more memory)", type(model).__name__
        )
        return None
    return base, head


def _window_nll_sum(
    hidden: torch.Tensor,
    to_logits: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    chunk_size: int,
) -> float:
    """Summed next-token cross-entropy of windows ids [B, T] from their hidden states
    [B, T, H] (or logits [B, T, V] with `to_logits` the identity), `chunk_size` positions at a
    time; T - 1 predictions per window."""
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B * (T-1), H)
    labels = ids[:, 1:].reshape(-1).to(hidden.device)  # (B * (T-1),)
    total = 0.0
    for i in range(0, labels.numel(), chunk_size):
        logits = to_logits(states[i : i + chunk_size])  # (chunk, V) fp32
        total += F.cross_entropy(logits, labels[i : i + chunk_size], reduction="sum").item()
    return total


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    seqlen: int = 2048,
    windows: int | None = None,
    batch_size: int = 1,
    chunk_size: int = 4096,
    progress: bool = False,
) -> dict[str, Any]:
    """Perplexity of a causal LM on token ids [1, numel] by the GPTQ protocol.

    Uses the first `windows` of the `numel // seqlen` non-overlapping windows (all by default),
    `batch_size` windows per forward pass and `chunk_size` positions per logits/loss chunk.
    Returns {"perplexity", "nll" (mean token cross-entropy), "windows", "tokens", "seqlen",
    "seconds"}.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape [1, numel], got {list(input_ids.shape)}; "
                         "tokenize the whole text once (llmc.calibration.tokenize_text)")
    for name, value, least in (("seqlen", seqlen, 2), ("batch_size", batch_size, 1),
                               ("chunk_size", chunk_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    available = input_ids.shape[1] // seqlen
    if windows is None:
        windows = available
    elif isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise ValueError(f"windows must be an integer >= 1 or None (all), got {windows!r}")
    elif windows > available:
        raise ValueError(f"asked for {windows} windows of {seqlen} tokens but the text has only "
                         f"{available} ({input_ids.shape[1]} tokens); pass windows <= {available}")
    if windows == 0:
        raise ValueError(f"the text has {input_ids.shape[1]} tokens, fewer than one window of "
                         f"seqlen={seqlen}; lower seqlen")

    device = _model_device(model)
    chunks = input_ids[0, : windows * seqlen].reshape(windows, seqlen)  # (n, seqlen)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            probe = chunks[:1, : min(seqlen, _CHECK_TOKENS)].to(device)
            split = _split_head(model, probe)
            softcap = _softcap(model)
            total = 0.0
            with tqdm(total=windows, desc="perplexity", unit="window", file=sys.stderr,
                      disable=not progress) as bar:
                for i in range(0, windows, batch_size):
                    batch = chunks[i : i + batch_size].to(device)  # (b, seqlen)
                    if split is not None:
                        base, head = split
                        hidden = base(input_ids=batch).last_hidden_state  # (b, seqlen, H)
                        to_logits = partial(_head_logits, head, softcap=softcap)
                    else:
                        hidden, to_logits = model(input_ids=batch).logits, _as_float
                    total += _window_nll_sum(hidden, to_logits, batch, chunk_size)
                    bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    # Equal-length windows: the mean over windows of per-window means is the token mean.
    nll = total / (windows * (seqlen - 1))
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "windows": windows,
        "tokens": windows * seqlen,
        "seqlen": seqlen,
        "seconds": time.perf_counter() - start,
    }


def _as_float(logits: torch.Tensor) -> torch.Tensor:
    return logits.float()


# Names that mean the protocol's evaluation text when evaluating the test split: for
# calibration, "wikitext2" is the wikitext-2-v1 validation split; for evaluation on "test", the
# raw test split (wiki.test.raw). Other splits keep the calibration meaning.
EVAL_ALIASES = {"wikitext2": "wikitext2-raw"}


def eval_dataset(dataset: str, split: str) -> str:
    """The dataset name :func:`evaluate_text` reads for ``dataset`` and ``split``."""
    return EVAL_ALIASES.get(dataset, dataset) if split == "test" else dataset


def evaluate_text(
    model: nn.Module,
    tokenizer: Any,
    dataset: str = "wikitext2",
    split: str = "test",
    seqlen: int = 2048,
    windows: int | None = None,
    *,
    batch_size: int = 1,
    chunk_size: int = 4096,
    progress: bool = False,
    text_column: str = "text",
) -> dict[str, Any]:
    """Perplexity on a dataset split: load_rows -> joined_text -> tokenize_text -> perplexity.

    The default is the protocol's evaluation text, the raw Wikitext-2 test split
    (`wikitext-2-raw-v1`, wiki.test.raw); ``wikitext2`` names it here (``EVAL_ALIASES``). The
    result of `perplexity` gains "dataset" and "split".
    """
    dataset = eval_dataset(dataset, split)
    rows = load_rows(dataset, split, text_column=text_column)
    ids = tokenize_text(tokenizer, joined_text(rows))
    logger.info("%s %s: %d rows, %d tokens", dataset, split, len(rows), ids.shape[1])
    result = perplexity(model, ids, seqlen=seqlen, windows=windows, batch_size=batch_size,
                        chunk_size=chunk_size, progress=progress)
    return {**result, "dataset": dataset, "split": split}
