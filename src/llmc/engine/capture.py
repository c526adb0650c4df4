"""Capture: the calibration windows through the embeddings, with every block replaced by a
recorder, giving block 0's inputs (written to the activation cache) and each block's other
arguments (attention masks, position embeddings) per chunk size."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from llmc.core.tree import map_tensors
from llmc.engine.cache import ActivationCache
from llmc.engine.lockstep import Reached
from llmc.interfaces import BlockArgs


class _Recorder(nn.Module):
    """Stands in for block ``index``: block 0's recorder writes the chunk's hidden states into
    the cache; every recorder keeps its block's arguments once per chunk size; the last one
    ends the forward before the final norm and the head."""

    def __init__(self, index: int, sink: dict) -> None:
        super().__init__()
        self.index = index
        self.sink = sink

    def forward(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        sink = self.sink
        n = hidden.shape[0]
        if self.index == 0 and sink["cache"] is not None:
            sink["cache"].write(sink["chunk"], hidden.detach())
        if n not in sink["args"][self.index]:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
            sink["args"][self.index][n] = (args, kwargs)
        elif self.index == 0:
            raise Reached  # arguments of this chunk size are known: only block 0's input needed
        if self.index == sink["last"]:
            raise Reached
        return hidden


def capture(model: nn.Module, blocks: nn.ModuleList, windows: Tensor, batch_size: int,
            device: torch.device, cache: ActivationCache | None,
            bar: Callable[[list[int]], Iterable[int]] = iter) -> list[BlockArgs]:
    """Run ``windows`` [S, T] through ``model`` chunk by chunk with ``blocks`` replaced by
    recorders. Block 0's inputs go to ``cache`` (as its outputs: call ``finish_block`` after);
    with ``cache=None`` only the first chunk of each size runs, for the arguments alone (a
    resumed run). ``bar`` wraps the chunks' starts (a progress bar). Returns each block's
    arguments per chunk size (CPU tensors)."""
    originals = list(blocks)
    sink: dict[str, Any] = {"cache": cache, "chunk": 0, "last": len(blocks) - 1,
                            "args": [{} for _ in blocks]}
    S = windows.shape[0]
    starts = list(range(0, S, batch_size))
    if cache is None:  # one chunk per size: the first, and a short last one
        starts = sorted({0, starts[-1]})
    try:
        for i in range(len(blocks)):
            blocks[i] = _Recorder(i, sink)
        with torch.no_grad():
            for start in bar(starts):
                sink["chunk"] = start // batch_size
                try:
                    model(input_ids=windows[start : start + batch_size].to(device),
                          use_cache=False)
                except Reached:
                    pass
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b
    return [{n: _to_cpu(a) for n, a in per.items()} for per in sink["args"]]


def _to_cpu(args: Any) -> Any:
    return map_tensors(args, lambda t: t.to("cpu"))
