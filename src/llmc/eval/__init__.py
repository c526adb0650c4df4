"""Evaluation: perplexity by the GPTQ protocol."""

from llmc.eval.perplexity import evaluate_text, perplexity

__all__ = ["evaluate_text", "perplexity"]
