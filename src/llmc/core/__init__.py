"""Tensors only: helpers that know nothing of models, methods or formats."""
