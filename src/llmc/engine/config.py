"""The walk's settings (the recipe's ``walker`` section)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmc.registry import register_section

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WalkerConfig:
    """``batch_size`` calibration windows per forward chunk; ``dtype`` of the block forwards
    (the weights being compressed and the Hessian sums stay float32).

    Mixture-of-experts layers: with ``all_experts``, every calibration token goes through every
    expert for the statistics while the block's output keeps only the routed ones; an expert
    whose statistics saw fewer than ``min_expert_tokens`` rows is compressed without data (GPTQ
    -> RTN, Wanda -> magnitude, SparseGPT -> magnitude then RTN, same settings) with a
    warning, never from an empty or near-empty Hessian."""

    batch_size: int = 8
    dtype: str = "bfloat16"
    all_experts: bool = False
    min_expert_tokens: int = 32

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} must be at least 1")
        if not isinstance(self.all_experts, bool):
            raise ValueError(f"all_experts: {self.all_experts!r} must be true or false")
        if not isinstance(self.min_expert_tokens, int) or self.min_expert_tokens < 0:
            raise ValueError(f"min_expert_tokens: {self.min_expert_tokens!r} must be an integer "
                             ">= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


register_section("walker", WalkerConfig)


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``auto`` (the first CUDA device, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``;
    refuses a CUDA device this machine does not have, with what to use instead."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "torch sees no GPU")
            raise ValueError(f"--device {spec}: no CUDA device is available ({why}); use "
                             "--device cpu")
        index = 0 if spec == "cuda" else spec.split(":", 1)[1]
        if not str(index).isdigit() or int(index) >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return torch.device(f"cuda:{int(index)}")
    raise ValueError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N")
