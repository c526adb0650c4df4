"""Compiling the Triton kernels ahead of time for a GPU this machine may lack (sm_90 by
default), with the ``ptxas`` and disassembler that Triton's wheel carries: the compile test
(``tests/kernels/compile_sm90.py``) and the instruction report (``benchmarks/kernel_sass.py``)
use it. Needs Triton, not a GPU; run without ``TRITON_INTERPRET`` (which swaps
``@triton.jit`` for the interpreter)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from collections import Counter


def compile_for(fn, constexprs: dict, pointers: dict, num_warps: int, num_stages: int,
                ints: dict | None = None, arch: int = 90):
    """``fn`` (a ``@triton.jit`` kernel) compiled for CUDA ``sm_<arch>``. ``constexprs``: the
    constexpr arguments; ``pointers``: the pointer arguments' types (``"*fp16"``...; others
    default to i32). ``ints``: the integer arguments' values, specialised as the JIT does (a 1
    becomes a constant, a multiple of 16 is marked so, pointers 16-byte aligned), for code as a
    real launch would run; without it every integer is a plain i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn.fn).parameters)
    const, sig, attrs = dict(constexprs), {}, {}
    for i, n in enumerate(names):
        if n in const:
            sig[n] = "constexpr"
        elif n in pointers:
            sig[n] = pointers[n]
            if ints is not None:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints is not None and ints[n] == 1:
            sig[n] = "constexpr"
            const[n] = 1
        else:
            sig[n] = "i32"
            if ints is not None and ints[n] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def disassemble(compiled) -> tuple[str, dict]:
    """(SASS text, {"regs": n, "stack": bytes}) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
    return sass, {"regs": int(regs.group(1)) if regs else None,
                  "stack": int(stack.group(1)) if stack else None}


def main_loop_mix(sass: str) -> Counter:
    """Opcodes (without modifiers) of the longest backward branch's body: the K loop."""
    lines = sass.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = i
    best = None
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            if best is None or i - labels[m.group(1)] > best[1] - best[0]:
                best = (labels[m.group(1)], i)
    ops: Counter = Counter()
    if best is None:
        return ops
    for line in lines[best[0]:best[1] + 1]:
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    return ops
