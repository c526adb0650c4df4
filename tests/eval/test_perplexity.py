"""Tests for llmc.eval.perplexity: the chunked loss equals the naive GPTQ-protocol reference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from llmc.eval import evaluate_text, perplexity

VOCAB = 100


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def tiny_gemma3(softcap: float) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=16, max_position_embeddings=256,
                              final_logit_softcapping=softcap)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config).eval()
        model.lm_head.weight.data.normal_(0, 5.0)  # large logits so the softcap matters
        return model


def token_ids(numel: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, numel), generator=torch.Generator().manual_seed(seed))


def naive_nll(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """The protocol with full logits: per-window mean shifted cross-entropy, mean over windows."""
    losses = []
    with torch.no_grad():
        for i in range(windows):
            window = ids[:, i * seqlen : (i + 1) * seqlen]
            logits = model(window).logits.float()
            losses.append(F.cross_entropy(logits[0, :-1], window[0, 1:]).item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_chunked_equals_naive(batch_size: int) -> None:
    model, ids, seqlen = tiny_llama(), token_ids(3 * 64 + 17), 64
    result = perplexity(model, ids, seqlen=seqlen, batch_size=batch_size, chunk_size=10)
    ref = naive_nll(model, ids, seqlen, 3)
    assert result["nll"] == pytest.approx(ref, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert result["windows"] == 3 and result["tokens"] == 3 * 64 and result["seqlen"] == 64
    assert result["seconds"] >= 0


def test_softcapped_head_equals_naive(caplog: pytest.LogCaptureFixture) -> None:
    model, ids = tiny_gemma3(softcap=3.0), token_ids(2 * 32)
    result = perplexity(model, ids, seqlen=32, chunk_size=7)
    assert "full logits" not in caplog.text  # the chunked path handled the softcap
    assert result["nll"] == pytest.approx(naive_nll(model, ids, 32, 2), rel=1e-5)


def test_unknown_logit_scaling_falls_back_to_full_logits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, ids = tiny_llama(), token_ids(2 * 32)
    model.logit_scale = 4.0
    original = model.forward

    def scaled(*args: object, **kwargs: object) -> object:
        out = original(*args, **kwargs)
        out.logits = out.logits * model.logit_scale
        return out

    model.forward = scaled
    result = perplexity(model, ids, seqlen=32, chunk_size=5)
    assert "full logits" in caplog.text
    assert result["nll"] == pytest.approx(naive_nll(model, ids, 32, 2), rel=1e-5)


def test_first_windows_and_tail_dropped() -> None:
    model, ids = tiny_llama(), token_ids(4 * 32 + 31)
    everything = perplexity(model, ids, seqlen=32)
    assert everything["windows"] == 4 and everything["tokens"] == 128
    first = perplexity(model, ids, seqlen=32, windows=2)
    assert first["windows"] == 2
    assert first["nll"] == pytest.approx(naive_nll(model, ids, 32, 2), rel=1e-5)
    assert everything["nll"] == pytest.approx(perplexity(model, ids[:, :128], seqlen=32)["nll"])


def test_too_many_windows_says_how_many_exist() -> None:
    with pytest.raises(ValueError, match="only 3"):
        perplexity(tiny_llama(), token_ids(3 * 32 + 5), seqlen=32, windows=4)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_llama(), token_ids(20), seqlen=32)
    with pytest.raises(ValueError, match=r"shape \[1, numel\]"):
        perplexity(tiny_llama(), token_ids(64)[0], seqlen=32)


def test_model_mode_is_restored() -> None:
    model = tiny_llama().train()
    perplexity(model, token_ids(64), seqlen=32)
    assert model.training


class ByteTokenizer:
    def __call__(self, text: str, **kwargs: object) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([[b % VOCAB for b in text.encode()]])}


def test_evaluate_text_on_a_file(tmp_path: Path) -> None:
    path = tmp_path / "eval.txt"
    path.write_text("".join(f"line {i} of the text\n" for i in range(20)), encoding="utf-8")
    model, tokenizer = tiny_llama(), ByteTokenizer()
    result = evaluate_text(model, tokenizer, str(path), "test", seqlen=64, windows=2)
    text = "\n\n".join(f"line {i} of the text\n" for i in range(20))
    ids = tokenizer(text)["input_ids"]
    assert result["nll"] == pytest.approx(naive_nll(model, ids, 64, 2), rel=1e-5)
    assert result["dataset"] == str(path) and result["windows"] == 2
