"""Random checkpoints of real shapes, written tensor by tensor: a Llama-2-7B-shaped model on a
machine with less memory than the model, for the engine's tests and benchmarks. Memory holds
one tensor at a time; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmc.core.safetensors import write_file

LLAMA2_7B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def write_random_checkpoint(path: str | Path, config: dict[str, Any],
                            dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            std: float = 0.02) -> Path:
    """Write a random model of ``config`` (a ``config.json`` dict) to ``path``: one shard per
    block plus one for the rest, an index, and ``config.json``. Weights are N(0, std) drawn
    from a seeded generator, norms are ones; returns ``path``."""
    from transformers import AutoConfig

    from llmc.models.adapters import get_adapter
    from llmc.models.lazy import skeleton

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = skeleton(hf)
    gen = torch.Generator().manual_seed(seed)
    adapter = get_adapter(hf)
    n = len(adapter.get_blocks(model))
    prefix = adapter.blocks + "."
    shards: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, p in model.named_parameters():  # a tied head once, under the embeddings' name
        piece = int(name[len(prefix):].split(".", 1)[0]) if name.startswith(prefix) else n
        shards.setdefault(f"model-{piece + 1:05d}-of-{n + 1:05d}.safetensors",
                          {})[name] = tuple(p.shape)
    weight_map, total = {}, 0
    for fname, tensors in shards.items():
        data = {}
        for name, shape in tensors.items():
            if len(shape) == 1:
                t = torch.ones(shape, dtype=dtype)
            else:
                t = (torch.randn(shape, generator=gen) * std).to(dtype)
            data[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        write_file(path / fname, data, metadata={"format": "pt"})
        del data
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_dict = hf.to_dict()
    hf_dict["dtype"] = str(dtype).removeprefix("torch.")
    hf_dict["architectures"] = [type(model).__name__]
    (path / "config.json").write_text(json.dumps(hf_dict, indent=2))
    return path
