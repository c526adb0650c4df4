"""A killed streaming run resumes from its last block boundary and gives the tensors an
uninterrupted run gives; a changed model or recipe, or a leftover without --resume, is
refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from checkpoints import assert_same_checkpoint, write_sharded
from conftest import calib_ids

import llmc
from llmc.engine import stream
from llmc.methods.gptq import GPTQ

GPTQ_RECIPE = {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 32}}],
               "walker": {"batch_size": 3, "dtype": "bfloat16"}}
DISTILL_RECIPE = {"steps": [{"method": "gptq", "args": {"bits": 3, "group_size": 32}},
                            {"method": "distill", "args": {"mode": "block", "steps": 2,
                                                           "heldout": 2, "eval_every": 1}}],
                  "walker": {"batch_size": 2, "dtype": "float32"}}
SIGNROUND_RECIPE = {"steps": [{"method": "signround",
                               "args": {"bits": 3, "group_size": 32, "iters": 3, "heldout": 2,
                                        "eval_every": 1}}],
                    "walker": {"batch_size": 2, "dtype": "float32"}}
RTN_RECIPE = {"steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 32}}]}


class Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_sharded(tmp_path_factory.mktemp("src") / "tiny", blocks=3)


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    out = {}
    base = tmp_path_factory.mktemp("ref")
    for name, recipe in (("gptq", GPTQ_RECIPE), ("distill", DISTILL_RECIPE),
                         ("signround", SIGNROUND_RECIPE), ("rtn", RTN_RECIPE)):
        out[name], _ = llmc.compress(str(src), recipe, calibration=calib_ids(7, 24),
                                     out=base / name, progress=False)
    return out


def kill_at_boundary(monkeypatch, at: int) -> None:
    original = stream.StreamingCheckpoint.boundary

    def boundary(self, blocks_done, *args, **kwargs):
        original(self, blocks_done, *args, **kwargs)
        if blocks_done == at:
            raise Killed

    monkeypatch.setattr(stream.StreamingCheckpoint, "boundary", boundary)


@pytest.mark.parametrize("name,recipe", [("gptq", GPTQ_RECIPE), ("distill", DISTILL_RECIPE),
                                         ("signround", SIGNROUND_RECIPE), ("rtn", RTN_RECIPE)])
@pytest.mark.parametrize("at", [0, 1, 2, 3])
def test_resume_after_a_kill_at_every_block_boundary(src, reference, tmp_path, monkeypatch,
                                                     name, recipe, at):
    if name == "rtn" and at == 0:
        pytest.skip("a recipe without calibration has no capture boundary")
    out = tmp_path / "o"
    x = calib_ids(7, 24)
    with monkeypatch.context() as m:
        kill_at_boundary(m, at)
        with pytest.raises(Killed):
            llmc.compress(str(src), recipe, calibration=x, out=out, progress=False)
    partial = stream.partial_dir(out)
    assert partial.is_dir() and not out.exists()
    state = stream.read_state(partial)
    assert state["blocks_done"] == at
    _, report = llmc.compress(str(src), recipe, calibration=x, out=out, progress=False,
                              resume=True)
    assert report.engine.get("resumed_from_block") == at
    assert_same_checkpoint(out, reference[name])
    assert not partial.exists()
    assert len(report.blocks) == 3
    if name == "signround":  # a block transform: its record per block, not per layer
        assert [t["block"] for t in report.transforms] == [0, 1, 2]
    else:
        assert len(report.layers) == 3 * 7


@pytest.mark.parametrize("call", [1, 9, 17])
def test_resume_after_a_kill_inside_a_block(src, reference, tmp_path, monkeypatch, call):
    out = tmp_path / "o"
    x = calib_ids(7, 24)
    original = GPTQ.compress
    calls = []

    def compress(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Killed
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(GPTQ, "compress", compress)
        with pytest.raises(Killed):
            llmc.compress(str(src), GPTQ_RECIPE, calibration=x, out=out, progress=False)
    assert stream.read_state(stream.partial_dir(out))["blocks_done"] == (call - 1) // 7
    llmc.compress(str(src), GPTQ_RECIPE, calibration=x, out=out, progress=False, resume=True)
    assert_same_checkpoint(out, reference["gptq"])


def test_resume_after_sigkill_with_the_cache_on_disk(src, reference, tmp_path):
    """A real SIGKILL (no cleanup runs) in the middle of block 2, the cache in files."""
    out = tmp_path / "o"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = {[str(Path(__file__).parents[1]), str(Path(__file__).parent)]!r}
        from conftest import calib_ids
        import llmc
        from llmc.methods.gptq import GPTQ
        original, calls = GPTQ.compress, []
        def compress(self, *a, **k):
            calls.append(1)
            if len(calls) == 18:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *a, **k)
        GPTQ.compress = compress
        llmc.compress({str(src)!r}, {GPTQ_RECIPE!r}, calibration=calib_ids(7, 24),
                      out={str(out)!r}, progress=False, cache="disk")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    state = stream.read_state(stream.partial_dir(out))
    assert state["blocks_done"] == 2 and state["caches"]["hidden"].endswith(".bin")
    llmc.compress(str(src), GPTQ_RECIPE, calibration=calib_ids(7, 24), out=out,
                  progress=False, resume=True, cache="disk")
    assert_same_checkpoint(out, reference["gptq"])


def test_leftover_without_resume_is_refused_and_kept(src, tmp_path, monkeypatch):
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        kill_at_boundary(m, 1)
        with pytest.raises(Killed):
            llmc.compress(str(src), GPTQ_RECIPE, calibration=calib_ids(7, 24), out=out,
                          progress=False)
    with pytest.raises(ValueError, match=r"1 of 3 blocks done.*--resume.*rm -r"):
        llmc.compress(str(src), GPTQ_RECIPE, calibration=calib_ids(7, 24), out=out,
                      progress=False)
    assert stream.read_state(stream.partial_dir(out))["blocks_done"] == 1


def test_resume_against_another_recipe_or_model_is_refused(src, tmp_path, monkeypatch):
    out = tmp_path / "o"
    x = calib_ids(7, 24)
    with monkeypatch.context() as m:
        kill_at_boundary(m, 1)
        with pytest.raises(Killed):
            llmc.compress(str(src), GPTQ_RECIPE, calibration=x, out=out, progress=False)
    other = {**GPTQ_RECIPE, "steps": [{"method": "gptq", "args": {"bits": 3, "group_size": 32}}]}
    with pytest.raises(ValueError, match=r"recipe changed \(steps\[0\]\.args\.bits: 4 -> 3\)"):
        llmc.compress(str(src), other, calibration=x, out=out, progress=False, resume=True)
    with pytest.raises(ValueError, match="calibration windows changed"):
        llmc.compress(str(src), GPTQ_RECIPE, calibration=calib_ids(7, 24, seed=5), out=out,
                      progress=False, resume=True)
    other_model = write_sharded(tmp_path / "other", blocks=3, shard="30KB")
    with pytest.raises(ValueError, match="model files changed"):
        llmc.compress(str(other_model), GPTQ_RECIPE, calibration=x, out=out, progress=False,
                      resume=True)
    # still resumable with the right inputs
    llmc.compress(str(src), GPTQ_RECIPE, calibration=x, out=out, progress=False, resume=True)
    assert (out / "config.json").is_file()


def test_resume_with_nothing_to_resume_starts_fresh(src, reference, tmp_path):
    out, _ = llmc.compress(str(src), GPTQ_RECIPE, calibration=calib_ids(7, 24),
                           out=tmp_path / "o", progress=False, resume=True)
    assert_same_checkpoint(out, reference["gptq"])


def test_an_error_before_the_first_boundary_leaves_nothing(src, tmp_path, monkeypatch):
    import llmc.engine.walker as walker

    def broken(*a, **k):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(walker, "capture", broken)
    with pytest.raises(RuntimeError):
        llmc.compress(str(src), GPTQ_RECIPE, calibration=calib_ids(7, 24), out=tmp_path / "o",
                      progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_resume_flag(src, reference, tmp_path, text_file):
    from click.testing import CliRunner

    from llmc.cli import cli

    out = tmp_path / "o"
    args = ["quantize", str(src), "--method", "rtn", "--group-size", "32", "-o", str(out),
            "--quiet", "--resume"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert_same_checkpoint(out, reference["rtn"])


W8A8_RECIPE = {"steps": [{"method": "smoothquant"},
                         {"method": "gptq", "args": {"bits": 8, "group_size": -1, "act_bits": 8}}],
               "walker": {"batch_size": 3, "dtype": "bfloat16"}}


KV_RECIPE = {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 32}}],
             "kv_cache": {}, "walker": {"batch_size": 3, "dtype": "bfloat16"}}


MIXED_RECIPE = {"steps": [
    {"method": "gptq", "targets": ["re:.*self_attn.*"],
     "args": {"bits": 8, "group_size": -1, "act_bits": 8, "act_strategy": "tensor",
              "act_dynamic": False}},
    {"method": "gptq", "targets": ["re:.*mlp.*"], "args": {"bits": 4, "group_size": 32}}],
    "walker": {"batch_size": 3, "dtype": "bfloat16"}}


@pytest.mark.parametrize("recipe", [W8A8_RECIPE, KV_RECIPE, MIXED_RECIPE],
                         ids=["w8a8", "kv-fp8", "mixed-static-w8a8+w4"])
def test_resume_keeps_the_activation_scheme(src, tmp_path, monkeypatch, recipe):
    """A W8A8 (or FP8 KV-cache) run killed after block 1 resumes into the checkpoint an
    uninterrupted run writes: the later blocks calibrate on quantized activations (KV scales
    of their own) and the config keeps the scheme."""
    x = calib_ids(7, 24)
    ref, _ = llmc.compress(str(src), recipe, calibration=x, out=tmp_path / "ref",
                           progress=False)
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        kill_at_boundary(m, 1)
        with pytest.raises(Killed):
            llmc.compress(str(src), recipe, calibration=x, out=out, progress=False)
    llmc.compress(str(src), recipe, calibration=x, out=out, progress=False, resume=True)
    assert_same_checkpoint(out, ref)
