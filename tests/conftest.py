"""Shared fixtures: tiny seeded models of every supported architecture, a byte-level tokenizer,
and a model directory on disk, so the fast suite needs no network and no real model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from llmc.core.safetensors import SafetensorsFile

# Triton reads TRITON_INTERPRET when it is first imported (transformers and compressed-tensors may
# import it before any kernel test runs): the kernels run on the CPU interpreter in the tests.
os.environ["TRITON_INTERPRET"] = "1"

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=260, max_position_embeddings=256)


def tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY)
    if arch == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"])
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                            num_attention_heads=4, vocab_size=260, max_position_embeddings=256,
                            word_embed_proj_dim=64)
    if arch == "llama3":  # Llama 3.x: rope scaling of type llama3, tied embeddings (3.2)
        return tf.LlamaConfig(**TINY, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    if arch == "qwen3":  # q/k norms over each head
        return tf.Qwen3Config(**TINY, head_dim=16)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gemma2":  # norms after attention and MLP, soft-capped logits, 1 + w norms
        return tf.Gemma2Config(**TINY, head_dim=16, sliding_window=8)
    if arch == "olmo2":  # norms after attention and MLP, none before; q/k norms
        return tf.Olmo2Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "granite":  # residual, embedding, attention and logit multipliers
        return tf.GraniteConfig(**TINY, residual_multiplier=0.5, embedding_multiplier=2.0,
                                attention_multiplier=0.25, logits_scaling=4.0)
    if arch == "smollm3":  # no rope in every fourth layer
        return tf.SmolLM3Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "cohere":  # attention and MLP in parallel on one norm's output
        return tf.CohereConfig(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "glm4":  # fused gate_up_proj, norms after attention and MLP too
        return tf.Glm4Config(**TINY, head_dim=16, pad_token_id=0, eos_token_id=2)
    if arch == "gpt_neox":  # fused query_key_value, parallel residual
        return tf.GPTNeoXConfig(**{k: v for k, v in TINY.items() if k != "num_key_value_heads"},
                                bos_token_id=1, eos_token_id=2)
    if arch == "mixtral":  # fused experts; original names block_sparse_moe.experts.E.w1/w2/w3
        return tf.MixtralConfig(**{**TINY, "intermediate_size": 32}, num_local_experts=4,
                                num_experts_per_tok=2, sliding_window=None)
    if arch == "qwen3_moe":  # fused experts, q/k norms
        return tf.Qwen3MoeConfig(**TINY, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                 num_experts_per_tok=2, norm_topk_prob=True)
    if arch == "qwen2_moe":  # fused experts plus a shared expert behind a sigmoid gate
        return tf.Qwen2MoeConfig(**TINY, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=48, num_experts=4,
                                 num_experts_per_tok=2)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "gemma3_text", "opt"]
# Found by the code (llmc.models.structure), each tested end to end in tests/models/.
MORE_ARCHS = ["llama3", "qwen3", "phi3", "gemma2", "olmo2", "granite", "smollm3", "cohere", "glm4",
              "gpt_neox"]
MOE_ARCHS = ["mixtral", "qwen3_moe", "qwen2_moe"]  # mixture of experts (tests/models/test_moe.py)


def tiny_model(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # test-only: transformers' init draws from the global RNG
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


def byte_tokenizer():
    """A byte-level tokenizer with 256 byte tokens and an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def calib_ids(samples: int = 8, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (samples, seqlen), generator=g)


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    """A small English text file for calibration and evaluation."""
    lines = []
    for i in range(400):
        lines.append(f" The {i}th line of a small corpus talks about weights and groups . \n")
        if i % 7 == 0:
            lines.append(" \n")
    p = tmp_path / "corpus.txt"
    p.write_text("".join(lines))
    return p


@pytest.fixture
def model_dir(tmp_path):
    """A tiny llama with its tokenizer saved as an HF directory."""
    d = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def wikitext():
    """Skip, with the reason, where Wikitext-2 is neither on disk nor reachable on the hub."""
    from llmc.calibration import load_rows

    try:
        load_rows("wikitext2-raw", "test")
        load_rows("wikitext2", "validation")
    except ValueError as e:
        pytest.skip(f"no Wikitext-2: {str(e).splitlines()[0]}")


def output_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors files."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        sf = SafetensorsFile(f)
        out.update({k: sf.read(k) for k in sf.keys()})
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every tensor equal (values and dtype) and the same ``config.json``."""
    ta, tb = output_tensors(a), output_tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k], tb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads(
        (b / "config.json").read_text())


def assert_exports_exactly(model, report, tmp_path: Path,
                           formats=("gptq", "compressed-tensors")) -> None:
    """``model`` saved in each format and loaded back: every parameter equal."""
    import llmc

    ref = dict(model.named_parameters())
    for fmt in formats:
        back, _ = llmc.load(llmc.save(model, tmp_path / fmt, report=report, format=fmt))
        for n, p in back.named_parameters():
            assert torch.equal(p, ref[n]), (fmt, n)
