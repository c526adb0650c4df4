"""What trains during distillation, and how the compression survives it.

Each trained Linear gets a ``torch.nn.utils.parametrize`` parametrization of its weight:
- pruned (a 2:4 or unstructured mask): the weight is multiplied by its keep mask, so pruned
  entries are exactly zero and get no gradient;
- quantized, ``trainable="weights"``: a latent float weight is rounded onto the layer's own grid
  (its scales, zero points and ``g_idx`` stay fixed) with a straight-through estimator;
- quantized, ``trainable="scales"``: the integer codes stay fixed and the scales train, as
  log-factors on the compressed scales (so that an optimizer step changes every scale by about
  the same fraction), rounded to fp16 by a straight-through estimator since writers store
  fp16 scales.
:func:`finalize` bakes each parametrization back into a plain weight on the grid (updating the
layer's ``llmc_quant`` scales in the second case), so that export writes the same formats,
bit-compatibly. Unquantized, unpruned Linears train freely.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from llmc.core.scheme import QuantState, round_half_even


def _ste(x: Tensor, y: Tensor) -> Tensor:
    """``y`` forward, identity backward."""
    return x + (y - x).detach()


class Masked(nn.Module):
    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, w: Tensor) -> Tensor:
        return w * self.mask


class OnGrid(nn.Module):
    """A latent weight rounded onto fixed qparams (straight-through), then masked."""

    def __init__(self, state: QuantState, mask: Tensor | None) -> None:
        super().__init__()
        g = state.g_idx.long()
        self.register_buffer("scale", state.scales.float()[:, g].contiguous())
        self.register_buffer("zero", state.zeros.float()[:, g].contiguous())
        self.register_buffer("mask", mask.to(torch.bool) if mask is not None else None)
        self.maxq = 2**state.bits - 1

    def forward(self, w: Tensor) -> Tensor:
        q = (round_half_even(w / self.scale) + self.zero).clamp(0, self.maxq)
        out = _ste(w, (q - self.zero) * self.scale)
        return out * self.mask if self.mask is not None else out


class TrainScales(nn.Module):
    """Fixed integer codes, scales ``s0 * exp(r)`` with trainable log-factors ``r`` [N, G]:
    ``W = (q - z) * s[:, g_idx]``."""

    def __init__(self, state: QuantState, weight: Tensor) -> None:
        super().__init__()
        g = state.g_idx.long()
        qw = state.codes(weight)
        self.register_buffer("offset", (qw.q.float() - state.zeros.float()[:, g]).contiguous())
        self.register_buffer("scales0", state.scales.float().clone())
        self.register_buffer("g_idx", g)

    def scales(self, log_factor: Tensor) -> Tensor:
        s = self.scales0 * log_factor.exp()
        return _ste(s, s.half().float())  # writers store fp16 scales

    def forward(self, log_factor: Tensor) -> Tensor:
        return self.offset * self.scales(log_factor)[:, self.g_idx]


def keep_mask(module: nn.Linear) -> Tensor | None:
    """The zeros a pruning step left in ``module`` (recorded by ``llmc_sparsity``, or by
    ``llmc_mask`` while the walker holds it)."""
    mask = getattr(module, "llmc_mask", None)
    if mask is not None:
        return mask
    if getattr(module, "llmc_sparsity", None) is not None:
        return module.weight.detach() != 0
    return None


def constrain(module: nn.Linear, trainable: str) -> str:
    """Parametrize ``module.weight`` for training; returns what it became ('masked', 'grid',
    'scales' or 'free')."""
    state: QuantState | None = getattr(module, "llmc_quant", None)
    if state is not None and state.type != "int":
        raise ValueError("distillation keeps weights on an integer grid; FP8 weights cannot be "
                         "distilled yet (drop the distill step)")
    mask = keep_mask(module)
    if state is None:
        if mask is None:
            return "free"
        parametrize.register_parametrization(module, "weight", Masked(mask))
        return "masked"
    if trainable == "scales":
        ts = TrainScales(state, module.weight.detach())
        # Registered on the weight, then the log-factors become the original tensor (unsafe:
        # the shapes differ).
        parametrize.register_parametrization(module, "weight", ts, unsafe=True)
        module.parametrizations.weight.original = nn.Parameter(torch.zeros_like(ts.scales0))
        return "scales"
    parametrize.register_parametrization(module, "weight", OnGrid(state, mask))
    return "grid"


def finalize(module: nn.Linear) -> None:
    """Bake the parametrization into a plain weight (on the grid, zeros kept); the scales a
    ``TrainScales`` learnt become the layer's qparams."""
    if not parametrize.is_parametrized(module, "weight"):
        return
    p = module.parametrizations.weight[0]
    if isinstance(p, TrainScales):
        with torch.no_grad():
            s = p.scales(module.parametrizations.weight.original)
        module.llmc_quant.scales = s.detach().clone()
    with torch.no_grad():
        w = module.weight.detach().clone()
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    module.weight = nn.Parameter(w, requires_grad=False)


@contextmanager
def trained(module: nn.Module, linears: dict[str, nn.Linear],
            trainable: str) -> Iterator[tuple[list[Tensor], dict[str, int]]]:
    """Freeze ``module``, :func:`constrain` its ``linears`` and yield (the tensors to train,
    how many Linears became each kind); on exit, even an interrupted one, :func:`finalize` them
    and freeze ``module`` again. Biases stay frozen: the formats store them as they are."""
    for p in module.parameters():
        p.requires_grad_(False)
    kinds: dict[str, int] = {}
    params = []
    try:
        for m in linears.values():
            kind = constrain(m, trainable)
            kinds[kind] = kinds.get(kind, 0) + 1
            p = m.weight if kind == "free" else m.parametrizations.weight.original
            p.requires_grad_(True)
            params.append(p)
        yield params, kinds
    finally:
        for m in linears.values():
            finalize(m)
        for p in module.parameters():
            p.requires_grad_(False)


class Best:
    """The lowest held-out score seen, the step it came at (0: before training) and a copy of
    the trained tensors then; :meth:`restore` puts them back."""

    def __init__(self, params: list[Tensor], score: float) -> None:
        self.params, self.score, self.step = params, score, 0
        self.state = [p.detach().clone() for p in params]

    def offer(self, score: float, step: int) -> bool:
        if score >= self.score:
            return False
        self.score, self.step = score, step
        self.state = [p.detach().clone() for p in self.params]
        return True

    def restore(self) -> None:
        with torch.no_grad():
            for p, b in zip(self.params, self.state):
                p.copy_(b)
