"""Triton kernels for compressed weights, each with a plain-torch ``*_ref`` twin that is the
CPU path and the reference of the tests (run on CPU with ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import importlib.util
import os

# Whether Triton is installed, looked up once (a plain constant, which torch.compile reads
# without tracing the lookup).
TRITON = importlib.util.find_spec("triton") is not None


def use_triton(device_type: str) -> bool:
    """The Triton kernels run on CUDA, or anywhere under ``TRITON_INTERPRET=1``."""
    if not TRITON:
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
