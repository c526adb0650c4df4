"""The plug-in interface of Linear compressors and the registry of methods.

A method is a frozen config dataclass plus a thin class that creates statistics objects
(``new_stats``) and compresses one weight (``compress``). Linears that read the same input
(q/k/v; gate/up) share one statistics object; methods whose ``stats_kind`` is equal share it
across recipe steps too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from llmc.quant.awq import AWQ, AWQConfig
from llmc.quant.gptq import GPTQConfig, HessianStats, gptq_quantize
from llmc.quant.rtn import RTNConfig, rtn_quantize
from llmc.quant.scheme import QuantizedWeight, output_error
from llmc.registry import Registry


@dataclass
class CompressResult:
    """The new dense weight [N, K] (fp32), its integer form when quantized, and the relative
    layer-output error ``tr(dW H dW^T) / tr(W H W^T)`` when a Hessian is known."""

    weight: Tensor
    quant: QuantizedWeight | None = None
    error: float | None = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class Stats(Protocol):
    def add_batch(self, inp: Tensor) -> None: ...


class LinearCompressor(Protocol):
    needs_calibration: bool
    sequential: bool
    stats_kind: str | None

    def new_stats(self, in_features: int) -> Stats | None: ...

    def compress(self, name: str, weight: Tensor, stats: Stats | None) -> CompressResult: ...


class BlockTransform(Protocol):
    """A step that rewrites a whole block from its cached inputs (AWQ's scales): ``transform``
    gets the walker's :class:`~llmc.walker.BlockContext` and the step, changes the block's
    float32 weights (the function it computes may change only as the method intends) and
    returns a JSON-able record for the report. ``check_model`` refuses an architecture or
    config before anything loads."""

    needs_calibration: bool

    def check_model(self, config: Any, adapter: Any) -> None: ...

    def transform(self, ctx: Any, step: Any) -> dict[str, Any]: ...


class RTN:
    """Round-to-nearest quantization; needs no calibration data."""

    needs_calibration = False
    sequential = False
    stats_kind = None

    def __init__(self, config: RTNConfig) -> None:
        self.config = config

    def new_stats(self, in_features: int) -> None:
        return None

    def compress(self, name: str, weight: Tensor, stats: Stats | None) -> CompressResult:
        t = time.perf_counter()
        qw = rtn_quantize(weight, self.config.scheme, self.config.clip_search)
        W = qw.dequantize()
        err = output_error(weight, W, stats.H) if isinstance(stats, HessianStats) else None
        return CompressResult(W, qw, err, time.perf_counter() - t)


class GPTQ:
    """GPTQ on the Hessian of each Linear's calibration inputs."""

    needs_calibration = True
    stats_kind = "hessian"

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config
        self.sequential = config.true_sequential

    def new_stats(self, in_features: int) -> HessianStats:
        return HessianStats(in_features)

    def compress(self, name: str, weight: Tensor, stats: Stats | None) -> CompressResult:
        assert isinstance(stats, HessianStats)
        if stats.nsamples == 0:
            raise ValueError(f"{name}: no calibration inputs reached this layer")
        c = self.config
        t = time.perf_counter()
        qw = gptq_quantize(
            weight, stats.H, c.scheme, act_order=c.act_order, damp=c.damp,
            block_size=c.block_size, clip=c.clip_search, name=name,
        )
        W = qw.dequantize()
        err = output_error(weight, W, stats.H)
        return CompressResult(W, qw, err, time.perf_counter() - t)


METHODS: Registry[type] = Registry("method")
METHODS.register("rtn", RTNConfig, RTN, "round-to-nearest weight quantization (no data)")
METHODS.register("gptq", GPTQConfig, GPTQ, "GPTQ weight quantization (Frantar et al. 2022)")
METHODS.register("awq", AWQConfig, AWQ,
                 "AWQ activation-aware scales, then clipping (Lin et al. 2024); a quantizer step "
                 "follows (rtn when the recipe has none)")

QUANTIZERS = ("rtn", "gptq")
