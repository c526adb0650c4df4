"""Activation quantization: the input of a Linear quantized in its forward, as an inference
engine quantizes it before a W8A8 matmul.

An :class:`ActScheme` is 8-bit integer (symmetric, codes in [-128, 127]) or FP8 E4M3, with one
scale per token computed in the forward (``dynamic``, strategy ``token``) or one per tensor
calibrated beforehand (static, strategy ``tensor``); or NVFP4 (4 bits, ``tensor_group``): E2M1
values in groups of 16 along the input, each group's E4M3 scale computed in the forward
(``dynamic="local"``) over a global scale ``448 * 6 / amax`` calibrated beforehand, the
weights' NVFP4 recipe applied to the input; or MXFP4 (4 bits, strategy ``group``, dynamic): E2M1
values in groups of 32 along the input, each group's power-of-two (E8M0) scale computed in the
forward, the weights' MXFP4 rule applied to the input. The scales follow vLLM's kernels, which
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

from llmc.core.scheme import (
    FP4_GROUP,
    FP4_MAX,
    FP8_MAX,
    MX_GROUP,
    QuantScheme,
    qparams_from_range,
    quantize,
    round_half_even,
)

ACT_TYPES = ("int", "float")
ACT_STRATEGIES = ("token", "group", "tensor", "tensor_group")
ACT_GROUP = 128  # strategy group: one dynamic scale per token and 128 input columns (vLLM's)
LOCAL = "local"  # NVFP4: group scales computed in the forward over a calibrated global scale
INT8_MAX = 127.0
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor for a dynamic FP8 scale (all-zero rows)


@dataclass(frozen=True)
class ActScheme:
    """Activation quantization of a Linear's input. 8 bits: ``type`` int or float (E4M3),
    ``strategy`` token (one scale per token, computed in the forward), group (per token and
    128 inputs) or tensor (one scale, calibrated when ``dynamic`` is False, or computed per
    call when True). 4 bits, ``type`` float: NVFP4 (``tensor_group``, ``dynamic="local"``) or
    MXFP4 (``group``, dynamic: groups of 32, power-of-two scales)."""

    type: str = "int"
    strategy: str = "token"
    dynamic: bool | str = True
    bits: int = 8

    def __post_init__(self) -> None:
        if self.type not in ACT_TYPES:
            raise ValueError(f"act_type: {self.type!r} is not one of {', '.join(ACT_TYPES)}")
        if self.strategy not in ACT_STRATEGIES:
            raise ValueError(f"act_strategy: {self.strategy!r} is not one of "
                             f"{', '.join(ACT_STRATEGIES)}")
        if self.bits == 4 and not (self.is_nvfp4 or self.is_mx):
            raise ValueError("4-bit activations are act_type float, either NVFP4 (act_strategy "
                             "tensor_group: groups of 16, local scales over a calibrated global "
                             "scale) or MXFP4 (act_strategy group, dynamic: groups of 32, "
                             "power-of-two scales)")
        if self.bits not in (4, 8):
            raise ValueError(f"act_bits: {self.bits} is not supported; activations are "
                             "quantized to 8 bits, or 4 (NVFP4 or MXFP4; 16 leaves them "
                             "unquantized)")
        if (self.strategy == "tensor_group" or self.dynamic == LOCAL) and not self.is_nvfp4:
            raise ValueError("act_strategy tensor_group (local dynamic scales) is NVFP4's: "
                             "act_bits 4, act_type float")
        if self.strategy == "group" and self.dynamic is not True:
            raise ValueError("act_strategy group (a scale per token and 128 inputs; at 4 bits "
                             "MXFP4's per 32) is dynamic: use act_dynamic true")
        if self.strategy == "token" and not self.dynamic:
            raise ValueError("per-token activation scales are computed in the forward: use "
                             "act_dynamic true, or act_strategy tensor for a static scale")

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.type == "float" else INT8_MAX

    @property
    def is_nvfp4(self) -> bool:
        """NVFP4: local group scales over a calibrated global scale."""
        return (self.bits, self.type, self.strategy, self.dynamic) == (
            4, "float", "tensor_group", LOCAL)

    @property
    def is_mx(self) -> bool:
        """MXFP4: dynamic power-of-two scales per token and 32 inputs."""
        return (self.bits, self.type, self.strategy, self.dynamic) == (4, "float", "group", True)

    @property
    def group_width(self) -> int | None:
        """Input columns per scale of a grouped scheme (which input widths must divide), None
        for per-token and per-tensor scales."""
        if self.strategy == "group":
            return MX_GROUP if self.bits == 4 else ACT_GROUP
        return FP4_GROUP if self.strategy == "tensor_group" else None

    def check_width(self, K: int) -> None:
        if self.group_width and K % self.group_width:
            raise ValueError(f"activations quantized in groups of {self.group_width} need an "
                             f"input width divisible by {self.group_width}, got {K}")

    def to_ct(self) -> dict[str, Any]:
        """compressed-tensors ``input_activations`` arguments."""
        if self.is_nvfp4:
            return {"num_bits": 4, "type": "float", "symmetric": True,
                    "strategy": "tensor_group", "dynamic": LOCAL, "group_size": FP4_GROUP,
                    "observer": "static_minmax", "observer_kwargs": {},
                    "scale_dtype": "torch.float8_e4m3fn", "block_structure": None,
                    "actorder": None}
        if self.is_mx:  # compressed-tensors' MXFP4 preset
            return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group",
                    "dynamic": True, "group_size": MX_GROUP, "observer": None,
                    "observer_kwargs": {}, "scale_dtype": "torch.uint8",
                    "zp_dtype": "torch.uint8", "block_structure": None, "actorder": None}
        return {"num_bits": self.bits, "type": self.type, "symmetric": True,
                "strategy": self.strategy, "dynamic": self.dynamic,
                "group_size": self.group_width,
                "observer": None if self.dynamic else "minmax", "observer_kwargs": {},
                "block_structure": None, "actorder": None}

    @classmethod
    def from_ct(cls, args: dict[str, Any]) -> ActScheme:
        if not args.get("symmetric", True):
            raise ValueError("asymmetric activation quantization is not supported")
        dynamic = args.get("dynamic", True)
        scheme = cls(type=args.get("type", "int"), strategy=args.get("strategy", "token"),
                     dynamic=dynamic if dynamic == LOCAL else bool(dynamic),
                     bits=int(args.get("num_bits", 8)))
        width = args.get("group_size")
        if scheme.group_width is not None and width not in (None, scheme.group_width):
            raise ValueError(f"input_activations: {scheme.bits}-bit {scheme.strategy} scales "
                             f"over {width} inputs are not supported; llmc reads groups of "
                             f"{scheme.group_width}")
        return scheme


def static_scale(amax: Tensor, scheme: ActScheme) -> Tensor:
    """A static per-tensor scale [1] (float32) from the calibrated ``max |x|``; for NVFP4 the
    global scale ``448 * 6 / amax`` (the checkpoint's ``input_global_scale``)."""
    a = amax.detach().float().reshape(1).cpu()
    if scheme.is_nvfp4:
        return torch.where(a > 0, FP8_MAX * FP4_MAX / a, torch.ones_like(a))
    return (a / scheme.qmax).clamp(min=MIN_SCALE)


def calibrated(config: Any) -> ActScheme | None:
    """The static activation scheme of a step's config (its scale calibrated on the
    calibration windows), None when it has none or a dynamic one."""
    act = getattr(config, "act_scheme", None)
    return act if act is not None and act.dynamic is not True else None


def act_scale(x: Tensor, scheme: ActScheme) -> Tensor:
    """The dynamic scale of ``x`` ([..., K]; per group: [..., G, 128]): per token or group
    [..., 1], or per tensor [] (float32)."""
    a = x.detach().abs().float()
    amax = a.amax() if scheme.strategy == "tensor" else a.amax(dim=-1, keepdim=True)
    return (amax / scheme.qmax).clamp(min=MIN_SCALE)


def fake_quantize_act(x: Tensor, scheme: ActScheme, scale: Tensor | None = None) -> Tensor:
    """``x`` quantized and dequantized on ``scheme`` (``scale`` given for a static scheme),
    in ``x``'s dtype."""
    if scheme.bits == 4:
        scheme.check_width(x.shape[-1])
    if scheme.is_nvfp4:
        return _fake_fp4(x, QuantScheme(4, FP4_GROUP, True, "float",
                                        global_scale=float(scale.reshape(-1)[0])))
    if scheme.is_mx:
        return _fake_fp4(x, QuantScheme(4, MX_GROUP, True, "float"))
    if scheme.strategy == "group":
        K = x.shape[-1]
        scheme.check_width(K)
        grouped = x.unflatten(-1, (K // ACT_GROUP, ACT_GROUP))
        return fake_quantize_act(grouped, ActScheme(scheme.type, "token", True, 8)).flatten(-2)
    s = act_scale(x, scheme) if scale is None else scale.to(x.device, torch.float32)
    y = x.float() / s
    if scheme.type == "float":
        y = y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    else:
        y = round_half_even(y).clamp_(-128.0, 127.0)
    return (y * s).to(x.dtype)


def _fake_fp4(x: Tensor, scheme: QuantScheme) -> Tensor:
    """``x`` [..., K] on the E2M1 grid in groups along K, with the weights' group scales of
    ``scheme`` (NVFP4 with its global scale, or MXFP4)."""
    K, width = x.shape[-1], scheme.group_size
    g = x.float().unflatten(-1, (K // width, width))
    amax = g.abs().amax(dim=-1, keepdim=True)
    scale, zero = qparams_from_range(-amax, amax, scheme)
    return (quantize(g, scale, zero, scheme) * scale).flatten(-2).to(x.dtype)


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
    if scheme.dynamic is not True and scale is None:
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
