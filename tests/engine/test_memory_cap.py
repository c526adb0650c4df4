"""A streaming run completes inside a memory cgroup whose limit is below the model's float32
size (a machine smaller than the model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from llmc.models.synthetic import LLAMA2_7B, write_random_checkpoint

CGROUP = Path("/sys/fs/cgroup/memory")
LIMIT = 1024 * 2**20
SHAPE = {**LLAMA2_7B, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 20,
         "num_attention_heads": 8, "num_key_value_heads": 8}


def _cgroup_reason() -> str | None:
    if not CGROUP.is_dir():
        return "no cgroup v1 memory controller at /sys/fs/cgroup/memory"
    if os.geteuid() != 0 or not os.access(CGROUP, os.W_OK):
        return "making a memory cgroup needs root"
    return None


@pytest.mark.skipif(_cgroup_reason() is not None, reason=_cgroup_reason() or "")
def test_rtn_streams_under_a_cap_below_the_float32_size(tmp_path):
    src = write_random_checkpoint(tmp_path / "m", SHAPE)
    config = json.loads((src / "config.json").read_text())
    params = sum(json.loads((src / "model.safetensors.index.json").read_text())
                 ["metadata"].values()) // 2  # bf16 on disk
    assert params * 4 > 1.4 * LIMIT, "the model must not fit the cap in float32"
    group = CGROUP / f"llmc-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(LIMIT))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(LIMIT))
        out = tmp_path / "o"
        cmd = (f'echo $$ > {group}/cgroup.procs && exec {sys.executable} -m llmc.cli quantize '
               f'{src} --method rtn --bits 4 --group-size 128 -o {out} --quiet')
        res = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        assert peak <= LIMIT
        report = json.loads((out / "llmc_report.json").read_text())
        assert len(report["blocks"]) == config["num_hidden_layers"]
        assert report["plan"]["budget_source"].startswith("the cgroup's limit")
        assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    finally:
        procs = (group / "cgroup.procs").read_text().split() if group.exists() else []
        for pid in procs:
            (CGROUP / "cgroup.procs").write_text(pid)
        group.rmdir()
