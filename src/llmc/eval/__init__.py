"""Evaluation: perplexity by the GPTQ protocol, task accuracy through lm-eval (``tasks``, an
optional extra imported on use), and model footprints for comparisons (``compare``)."""

from llmc.eval.perplexity import evaluate_text, perplexity

__all__ = ["evaluate_text", "perplexity"]
