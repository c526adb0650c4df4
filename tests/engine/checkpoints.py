"""Tiny random checkpoints on disk for the engine's tests: sharded bf16 safetensors and GGUF
files, and a reader of every tensor of an output directory."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import assert_same_checkpoint, byte_tokenizer, output_tensors, tiny_config  # noqa: F401


def tiny_llama(blocks: int = 3, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
               tied: bool = False):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = blocks
    cfg.tie_word_embeddings = tied
    torch.manual_seed(seed)  # test-only: transformers' init draws from the global RNG
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def write_sharded(path: Path, blocks: int = 3, dtype: torch.dtype = torch.bfloat16,
                  tied: bool = False, shard: str = "40KB") -> Path:
    """A tiny llama saved by transformers in several shards with an index, and its tokenizer."""
    tiny_llama(blocks, dtype=dtype, tied=tied).save_pretrained(path, max_shard_size=shard)
    byte_tokenizer().save_pretrained(path)
    return path


def write_gguf(path: Path, blocks: int = 3) -> Path:
    """A tiny llama as a GGUF file: norms F32, attention F16, the rest Q8_0."""
    import gguf
    import numpy as np

    model = tiny_llama(blocks, dtype=torch.float32)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    for name, t in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        key = f"{names.get_name(base)}.{suffix}"
        arr = t.float().numpy()
        if "norm" in name:
            w.add_tensor(key, arr)
        elif "attn" in name:
            w.add_tensor(key, arr.astype(np.float16))
        else:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(key, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
