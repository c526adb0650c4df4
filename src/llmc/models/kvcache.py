"""A quantized KV cache in transformers models: the keys (after the rotary embedding) and
values each attention layer attends over are fake-quantized on its calibrated static scales, as
an engine with an FP8 cache stores them.

transformers hands every attention layer's ``query, key, value`` to an attention function
looked up by ``config._attn_implementation``; :func:`enable` registers a wrapper of the model's
function (``llmc_kv|sdpa``, ``llmc_kv|eager``, ...) and points the config at it. The wrapper
changes nothing for a module without a scheme. An attention module is quantized by three
attributes, which ``copy.deepcopy`` keeps:

- ``llmc_kv``: the :class:`~llmc.core.act.KVCacheScheme`;
- ``llmc_kv_name``: its full name, under which an :func:`observing` callback sees its keys and
  values (how the walker calibrates the scales);
- ``llmc_kv_scales``: ``(k_scale, v_scale)`` once calibrated; the checkpoint's
  ``{name}.k_scale`` and ``{name}.v_scale`` (a None side stays unquantized: a measurement's
  keys-only or values-only cache).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from torch import Tensor, nn

from llmc.core.act import KVCacheScheme, fake_quantize_act, head_amax
from llmc.registry import register_section

PREFIX = "llmc_kv|"
SCALE_NAMES = ("k_scale", "v_scale")
Observer = Callable[[str, Tensor, Tensor], None]
_observer: list[Observer] = []  # the innermost observing() callback last

register_section("kv_cache", KVCacheScheme)


def attention_modules(root: nn.Module) -> dict[str, nn.Module]:
    """name -> attention module under ``root``: the outermost modules whose class name says
    attention and which hold the key and value projections (``k_proj``/``v_proj``, or a fused
    ``qkv_proj``)."""
    out: dict[str, nn.Module] = {}
    for name, m in root.named_modules():
        if "attention" not in type(m).__name__.lower():
            continue
        if not (hasattr(m, "k_proj") and hasattr(m, "v_proj")) and not hasattr(m, "qkv_proj"):
            continue
        if any(name.startswith(p + ".") for p in out):
            continue
        out[name] = m
    return out


def _original(module: nn.Module, impl: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":  # every modeling file has its own eager attention
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _wrapper(impl: str) -> Callable:
    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
        scheme = getattr(module, "llmc_kv", None)
        if scheme is not None:
            name = getattr(module, "llmc_kv_name", None)
            if _observer and name is not None:
                _observer[-1](name, key, value)
            k_scale, v_scale = getattr(module, "llmc_kv_scales", None) or (None, None)
            if k_scale is not None:
                key = fake_quantize_act(key, scheme.act, k_scale)
            if v_scale is not None:
                value = fake_quantize_act(value, scheme.act, v_scale)
        return _original(module, impl)(module, query, key, value, *args, **kwargs)

    return attention


def enable(model: nn.Module) -> None:
    """Route ``model``'s attention through the quantizing wrapper (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    config = model.config
    impl = config._attn_implementation or "eager"
    if impl.startswith(PREFIX):
        return
    name = PREFIX + impl
    AttentionInterface.register(name, _wrapper(impl))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    config._attn_implementation = name
    text = config.get_text_config()
    if text is not config:
        text._attn_implementation = name


def mark(root: nn.Module, scheme: KVCacheScheme, prefix: str = "") -> dict[str, nn.Module]:
    """Give every attention module under ``root`` the scheme and its full name (``prefix`` +
    relative name); its scales stay unset until :func:`set_scales`. Returns the modules by
    full name."""
    out = {}
    for name, m in attention_modules(root).items():
        m.llmc_kv = scheme
        m.llmc_kv_name = prefix + name
        m.llmc_kv_scales = None
        out[prefix + name] = m
    return out


def set_scales(module: nn.Module, scheme: KVCacheScheme, k_scale: Tensor,
               v_scale: Tensor) -> None:
    """Quantize ``module``'s keys and values on these static scales from now on."""
    module.llmc_kv = scheme
    module.llmc_kv_scales = (k_scale.detach().float(), v_scale.detach().float())


@contextlib.contextmanager
def observing(callback: Observer) -> Iterator[None]:
    """``callback(name, key, value)`` for every marked attention module called inside."""
    _observer.append(callback)
    try:
        yield
    finally:
        _observer.pop()


class KVRanges:
    """The running ``max |k|`` and ``max |v|`` per head of each attention module, fed by
    :func:`observing`; :meth:`scales` turns them into the scheme's static scales."""

    def __init__(self) -> None:
        self.amax: dict[str, tuple[Tensor, Tensor]] = {}

    def __call__(self, name: str, key: Tensor, value: Tensor) -> None:
        k, v = head_amax(key).cpu(), head_amax(value).cpu()
        if name in self.amax:
            k0, v0 = self.amax[name]
            k, v = k.maximum(k0), v.maximum(v0)
        self.amax[name] = (k, v)

    def pop_scales(self, name: str, scheme: KVCacheScheme) -> tuple[Tensor, Tensor]:
        if name not in self.amax:
            raise ValueError(f"{name}: the attention never ran on the calibration windows, so "
                             "its KV-cache scales cannot be calibrated")
        k, v = self.amax.pop(name)
        return scheme.scale(k), scheme.scale(v)
