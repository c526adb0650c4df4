"""The plan: figures from the config alone, the cache placement and lockstep mode it picks
under a budget, refusals with the figures, and --dry-run."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import write_sharded
from click.testing import CliRunner
from conftest import tiny_config

from llmc.cli import cli
from llmc.engine.plan import Shape, Work, make_plan
from llmc.models import get_adapter
from llmc.models.lazy import skeleton
from llmc.recipe import Recipe

GPTQ = {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 32}}]}


def plan_for(budget: int, recipe=GPTQ, **kw):
    config = tiny_config("llama")
    model = skeleton(config)
    r = Recipe.from_dict(recipe)
    steps = [(i, s, s.compressor()) for i, s in enumerate(r.steps)]
    shape = Shape.of(model, get_adapter(config), lambda n: any(s.selects(n) for s in r.steps))
    args = dict(samples=256, seqlen=256, batch_size=8, walker_dtype=torch.bfloat16,
                device=torch.device("cpu"), mode="stream", baseline=0, budget=(budget, "test"),
                stored_bytes=10**6, save_bytes=2, out_parent=None, offload_dir=None,
                probe=False)
    args.update(kw)
    return make_plan(shape, Work.of(steps), **args)


def test_the_plan_picks_what_fits():
    roomy = plan_for(10**12)
    assert (roomy.cache, roomy.lockstep) == ("ram", "lockstep") and roomy.fits()
    block = next(p for p in roomy.phases if p.name == "block")
    cache = block.parts["activation cache"]
    paused = block.parts["paused chunks"]
    assert cache == 2 * 256 * 256 * 64 * 2  # two bf16 buffers of [S, T, d]
    assert paused > cache
    peak = roomy.peak_ram
    on_disk = plan_for(peak - cache // 2)
    assert (on_disk.cache, on_disk.lockstep) == ("disk", "lockstep") and on_disk.fits()
    replay = plan_for(peak - int(1.2 * cache))  # the disk saves 1.1 x cache: not enough
    assert replay.lockstep == "replay" and replay.fits()
    nothing = plan_for(10**6)
    assert not nothing.fits()
    with pytest.raises(ValueError, match=r"needs .* GiB of RAM at its peak \(block: .*test "
                                         r"allows .*--max-memory"):
        nothing.check()


def test_forced_choices_are_kept():
    p = plan_for(10**12, cache="disk", lockstep="replay")
    assert (p.cache, p.lockstep) == ("disk", "replay")
    block = next(x for x in p.phases if x.name == "block")
    assert block.parts["activation cache"] == 0 and block.parts["paused chunks"] == 0


def test_rtn_needs_no_cache_and_no_capture():
    p = plan_for(10**12, recipe={"steps": [{"method": "rtn"}]})
    assert [x.name for x in p.phases] == ["block", "write"]
    assert p.lockstep == "n/a"


def test_disk_refusal(tmp_path, monkeypatch):
    import llmc.engine.plan as plan

    class Usage:
        free = 1000

    monkeypatch.setattr(plan.shutil, "disk_usage", lambda _p: Usage)
    p = plan_for(10**12, out_parent=tmp_path)
    with pytest.raises(ValueError, match="need about .* free there: free some disk space"):
        p.check()


def run(*args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, text_file):
    src = write_sharded(tmp_path / "m", blocks=2)
    out = tmp_path / "o"
    res = run("quantize", src, "--bits", 4, "--group-size", 32, "--dataset", text_file,
              "--samples", 4, "--seqlen", 32, "-o", out, "--dry-run")
    assert "plan: stream on cpu" in res.output and "peak RAM" in res.output
    assert "time (estimate)" in res.output
    plan = json.loads(run("quantize", src, "--bits", 4, "--group-size", 32, "--dataset",
                          text_file, "--samples", 4, "--seqlen", 32, "-o", out, "--dry-run",
                          "--json").output)
    assert plan["cache"] == "ram" and plan["peak_ram"] > plan["baseline"] > 0
    assert {p["name"] for p in plan["phases"]} == {"capture", "block", "write"}
    res = run("quantize", src, "--dataset", text_file, "--seqlen", 32, "-o", out, "--dry-run",
              "--max-memory", "1MiB", "--group-size", 32, ok=False)
    assert res.exit_code == 1 and "would be refused" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "m"]
