"""Activation quantization: the input of a Linear quantized in its forward, as an inference
engine quantizes it before a W8A8 matmul.

An :class:`ActScheme` is 8-bit integer (symmetric, codes in [-128, 127]) or FP8 E4M3, with one
scale per token computed in the forward (``dynamic``, strategy ``token``) or one per tensor
calibrated beforehand (static, strategy ``tensor``). The scales follow vLLM's kernels, which
are what serves these checkpoints: ``amax / 127`` for INT8 and ``amax / 448`` for FP8, per
token row of the flattened input. (The compressed-tensors package's own CPU fake-quantization
divides INT8 by 127.5, so transformers' logits on an INT8 W8A8 export differ from llmc's by
that rounding; FP8 agrees exactly.)

:func:`attach` puts a forward pre-hook on a Linear that fake-quantizes its input (quantize,
then dequantize back into the input's dtype), so that evaluating the model on any device
measures what the engine computes; :func:`detach` removes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llmc.core.scheme import FP8_MAX, round_half_even

ACT_TYPES = ("int", "float")
ACT_STRATEGIES = ("token", "tensor")
INT8_MAX = 127.0
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor for a dynamic FP8 scale (all-zero rows)


@dataclass(frozen=True)
class ActScheme:
    """8-bit activation quantization of a Linear's input: ``type`` int or float (E4M3),
    ``strategy`` token (one scale per token, computed in the forward) or tensor (one scale,
    calibrated when ``dynamic`` is False, or computed per call when True)."""

    type: str = "int"
    strategy: str = "token"
    dynamic: bool = True
    bits: int = 8

    def __post_init__(self) -> None:
        if self.type not in ACT_TYPES:
            raise ValueError(f"act_type: {self.type!r} is not one of {', '.join(ACT_TYPES)}")
        if self.strategy not in ACT_STRATEGIES:
            raise ValueError(f"act_strategy: {self.strategy!r} is not one of "
                             f"{', '.join(ACT_STRATEGIES)}")
        if self.bits != 8:
            raise ValueError(f"act_bits: {self.bits} is not supported; activations are "
                             "quantized to 8 bits (16 leaves them unquantized)")
        if self.strategy == "token" and not self.dynamic:
            raise ValueError("per-token activation scales are computed in the forward: use "
                             "act_dynamic true, or act_strategy tensor for a static scale")

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.type == "float" else INT8_MAX

    def to_ct(self) -> dict[str, Any]:
        """compressed-tensors ``input_activations`` arguments."""
        return {"num_bits": self.bits, "type": self.type, "symmetric": True,
                "strategy": self.strategy, "dynamic": self.dynamic, "group_size": None,
                "observer": None if self.dynamic else "minmax", "observer_kwargs": {},
                "block_structure": None, "actorder": None}

    @classmethod
    def from_ct(cls, args: dict[str, Any]) -> ActScheme:
        if not args.get("symmetric", True):
            raise ValueError("asymmetric activation quantization is not supported")
        return cls(type=args.get("type", "int"), strategy=args.get("strategy", "token"),
                   dynamic=bool(args.get("dynamic", True)), bits=int(args.get("num_bits", 8)))


def static_scale(amax: Tensor, scheme: ActScheme) -> Tensor:
    """A static per-tensor scale [1] (float32) from the calibrated ``max |x|``."""
    return (amax.detach().float().reshape(1) / scheme.qmax).clamp(min=MIN_SCALE).cpu()


def calibrated(config: Any) -> ActScheme | None:
    """The static activation scheme of a step's config (its scale calibrated on the
    calibration windows), None when it has none or a dynamic one."""
    act = getattr(config, "act_scheme", None)
    return act if act is not None and not act.dynamic else None


def act_scale(x: Tensor, scheme: ActScheme) -> Tensor:
    """The dynamic scale of ``x`` ([..., K]): per token [..., 1], or per tensor [] (float32)."""
    a = x.detach().abs().float()
    amax = a.amax(dim=-1, keepdim=True) if scheme.strategy == "token" else a.amax()
    return (amax / scheme.qmax).clamp(min=MIN_SCALE)


def fake_quantize_act(x: Tensor, scheme: ActScheme, scale: Tensor | None = None) -> Tensor:
    """``x`` quantized and dequantized on ``scheme`` (``scale`` given for a static scheme),
    in ``x``'s dtype."""
    s = act_scale(x, scheme) if scale is None else scale.to(x.device, torch.float32)
    y = x.float() / s
    if scheme.type == "float":
        y = y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    else:
        y = round_half_even(y).clamp_(-128.0, 127.0)
    return (y * s).to(x.dtype)


def quantize_inputs(module: nn.Module, args: tuple) -> tuple | None:
    """``args`` of a call of ``module`` with its input quantized on the module's activation
    scheme (None when it has none): the pre-hook :func:`attach` registers."""
    scheme = getattr(module, "llmc_act", None)
    if scheme is None or not args:
        return None
    return (fake_quantize_act(args[0], scheme, getattr(module, "llmc_act_scale", None)),
            *args[1:])


def attach(linear: nn.Module, scheme: ActScheme, scale: Tensor | None = None) -> None:
    """Quantize ``linear``'s input in its forward from now on (``scale``: a static scheme's
    calibrated per-tensor scale). Replaces an earlier activation scheme of the module. The
    scheme lives in the module's ``llmc_act`` attribute, read by one pre-hook at each call, so
    a copy of the module (``copy.deepcopy``) quantizes the same way."""
    if not scheme.dynamic and scale is None:
        raise ValueError("a static activation scheme needs its calibrated scale")
    linear.llmc_act = scheme
    linear.llmc_act_scale = scale
    if not getattr(linear, "_llmc_act_hooked", False):
        linear.register_forward_pre_hook(quantize_inputs)
        linear._llmc_act_hooked = True


def detach(linear: nn.Module) -> None:
    """Inputs of ``linear`` stay as they are from now on."""
    for attr in ("llmc_act", "llmc_act_scale"):
        if hasattr(linear, attr):
            delattr(linear, attr)


KV_STRATEGIES = ("tensor", "attn_head")


@dataclass(frozen=True)
class KVCacheScheme:
    """Quantization of the attention's keys (after the rotary embedding) and values as an
    engine stores them in its KV cache: FP8 E4M3 with static scales calibrated on the
    calibration windows, one per tensor (``k_scale``, ``v_scale`` of shape [1], what vLLM's
    FP8 cache reads) or one per key/value head (``attn_head``: [H_kv, 1, 1])."""

    type: str = "float"
    bits: int = 8
    strategy: str = "tensor"

    def __post_init__(self) -> None:
        if (self.type, self.bits) != ("float", 8):
            raise ValueError(f"kv_cache: type {self.type!r} bits {self.bits} is not supported; "
                             "the KV cache is quantized to FP8 E4M3 (type float, bits 8)")
        if self.strategy not in KV_STRATEGIES:
            raise ValueError(f"kv_cache.strategy: {self.strategy!r} is not one of "
                             f"{', '.join(KV_STRATEGIES)}")

    @property
    def act(self) -> ActScheme:
        """The static activation scheme each of k and v is fake-quantized with."""
        return ActScheme(self.type, "tensor", dynamic=False, bits=self.bits)

    def scale(self, head_amax: Tensor) -> Tensor:
        """The static scale from the calibrated maxima of ``|k|`` (or ``|v|``) per head
        ([H_kv]): [1] per tensor, [H_kv, 1, 1] per head (float32)."""
        a = head_amax.detach().float()
        a = a.amax().reshape(1) if self.strategy == "tensor" else a.reshape(-1, 1, 1)
        return (a / self.act.qmax).clamp(min=MIN_SCALE)

    def to_ct(self) -> dict[str, Any]:
        """compressed-tensors ``kv_cache_scheme``."""
        return {"num_bits": self.bits, "type": self.type, "symmetric": True,
                "strategy": self.strategy, "dynamic": False, "group_size": None,
                "observer": "minmax", "observer_kwargs": {}, "block_structure": None,
                "actorder": None}

    @classmethod
    def from_ct(cls, args: dict[str, Any]) -> KVCacheScheme:
        if not args.get("symmetric", True) or args.get("dynamic", False):
            raise ValueError("kv_cache_scheme: llmc reads symmetric static KV-cache scales")
        return cls(type=args.get("type", "float"), bits=int(args.get("num_bits", 8)),
                   strategy=args.get("strategy", "tensor"))


def head_amax(x: Tensor) -> Tensor:
    """``max |x|`` per head of keys or values [B, H, S, D]: [H] float32."""
    return x.detach().abs().float().amax(dim=(0, 2, 3))
