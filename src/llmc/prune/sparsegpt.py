"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"): prune column block by column block with the OBS update of GPTQ, the mask
chosen inside each block of 128 columns on the updated weights by ``w^2 / [H^-1]_jj^2`` (for
N:M, each run of M columns when the loop reaches it); optionally quantizing in the same pass.
The loop is :func:`llmc.quant.gptq.obs_compress`."""

from __future__ import annotations

from dataclasses import dataclass

from llmc.prune.masks import PruneArgs
from llmc.quant.scheme import QuantScheme


@dataclass(frozen=True)
class SparseGPTConfig(PruneArgs):
    """Arguments of the ``sparsegpt`` step. ``scope``: ``layer`` (each block's entries ranked
    together, as the reference) or ``row``. ``damp``/``block_size``/``true_sequential`` as for
    GPTQ. ``bits`` > 0 quantizes jointly in the same pass (the paper's 50% + 4-bit and
    2:4 + 4-bit) with ``group_size``/``sym``; pruned entries get the zero point's code."""

    scope: str = "layer"
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    bits: int = 0
    group_size: int = 128
    sym: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise ValueError(f"damp: {self.damp} must lie in (0, 1); the usual value is 0.01")
        if self.block_size < 1:
            raise ValueError(f"block_size: {self.block_size} must be a positive integer")
        nm = self.nm
        if nm and nm[1] > self.block_size:
            raise ValueError(f"pattern: M={nm[1]} is wider than block_size {self.block_size}")
        if self.bits:
            QuantScheme(self.bits, self.group_size, self.sym)

    @property
    def scheme(self) -> QuantScheme | None:
        """The joint quantization scheme (None: prune only)."""
        return QuantScheme(self.bits, self.group_size, self.sym) if self.bits else None
