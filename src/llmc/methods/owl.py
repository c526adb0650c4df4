"""Outlier-weighted layerwise sparsity (OWL; Yin et al. 2024, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Before pruning, one pass of the calibration windows through the uncompressed blocks measures
each block's outlier ratio ``D``: the fraction of its Wanda scores ``|W_ij| * ||X_j||`` above
``M`` times the block's mean score. Blocks with more outliers keep more weights: the ratios are
scaled into ``[0, 2 * lambda]``, centred, and set around the target, so the blocks' sparsities
lie within ``target +- lambda`` and average to the target."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from llmc.core.masks import wanda_scores
from llmc.core.stats import ColumnNormStats
from llmc.interfaces import ModelPass
from llmc.models import block_linears

if TYPE_CHECKING:
    from llmc.methods.prune import PruneArgs


def outlier_ratio(scores: list[Tensor], m: float) -> float:
    """Fraction of all entries of ``scores`` above ``m`` times their overall mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum()) for s in scores) / max(total, 1)
    return sum(int((s > m * mean).sum()) for s in scores) / max(total, 1)


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsity from outlier ratios: ``target + lam - 2 lam (D - min) / (max - min)``
    re-centred on ``target`` (uniform when every ``D`` is equal); clamped to [0, 0.99]."""
    d = torch.tensor(ratios, dtype=torch.float64)
    span = float(d.max() - d.min()) if len(ratios) else 0.0
    if span == 0.0:
        return [target] * len(ratios)
    density = (d - d.min()) / span * (2 * lam)
    density = density - density.mean() + (1 - target)
    return [min(max(1 - float(x), 0.0), 0.99) for x in density]


def owl_plan(passes: ModelPass, step: Any,
             config: PruneArgs) -> tuple[dict[str, float], dict[str, Any]]:
    """Outlier ratios of every block from a pass through the uncompressed model; returns
    ``{block prefix: sparsity}`` and a record for the report."""

    def visit(ctx: Any, module: nn.Module):
        stats: dict[str, ColumnNormStats] = {}
        handles = []
        for name, lin in block_linears(module).items():
            if not step.selects(ctx.prefix + name):
                continue
            st = stats[name] = passes.prepare(ColumnNormStats(lin.in_features))
            handles.append(lin.register_forward_pre_hook(
                lambda _m, inp, st=st: st.add_batch(inp[0])))

        def done() -> float:
            for h in handles:
                h.remove()
            for st in stats.values():  # over several processes: every rank's windows
                passes.reduce(st)
            masters = block_linears(ctx.block)
            scores = [wanda_scores(masters[n].weight.data, st.norms) for n, st in stats.items()]
            return outlier_ratio(scores, config.owl_m) if scores else 0.0

        return done

    ratios = passes.dense_pass(visit, desc="OWL outlier ratios")
    sparsities = owl_sparsities(ratios, config.sparsity, config.owl_lambda)
    record = {"owl": {"outlier_ratio": ratios, "block_sparsity": sparsities,
                      "lambda": config.owl_lambda, "m": config.owl_m}}
    return block_sparsity(passes, record), record


def block_sparsity(passes: ModelPass, record: dict[str, Any]) -> dict[str, float]:
    """``{block prefix: sparsity}`` from a plan's record (a resumed run reads it back)."""
    ratios = record["owl"]["block_sparsity"]
    return {passes.prefix(b): r for b, r in enumerate(ratios)}
