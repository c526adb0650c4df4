"""Triton kernels for compressed weights, each with a plain-torch ``*_ref`` twin that is the
CPU path and the reference of the tests (run on CPU with ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result  # torch.compile evaluates it once, does not trace it
def use_triton(device_type: str) -> bool:
    """The Triton kernels run on CUDA, or anywhere under ``TRITON_INTERPRET=1``."""
    if not triton_available():
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
