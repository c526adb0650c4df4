"""Every kernel compiled for a Hopper GPU (sm_90) on the CPU, with the ``ptxas`` that Triton's
wheel carries: catches what the interpreter lets through (a global read inside a kernel,
layouts, dtypes), one config of each kernel and mode. Runs in a subprocess, since
``TRITON_INTERPRET`` (set for the other kernel tests) swaps ``@triton.jit`` for the
interpreter at import."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed (pip install triton)")


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_sm90.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["failed"] == {}
    assert result["compiled"] >= 13
