"""Distributed calibration (gloo on the CPU, launched through torchrun on localhost): 1, 2 and 3
ranks give identical checkpoints with exact statistics and nearly identical ones without; a
rank that dies ends every rank, leaves no output, and the run resumes with another number of
ranks to the same checkpoint; what does not run distributed yet is refused before anything
loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import assert_same_checkpoint, output_tensors, write_sharded
from conftest import calib_ids

import llmc
from llmc.core.scheme import QuantScheme
from llmc.core.stats import ColumnNormStats, HessianStats
from llmc.engine.distributed import Distributed, pack_result, unpack_result
from llmc.engine.walker import check_distributed
from llmc.interfaces import CompressResult

WORKER = Path(__file__).with_name("dist_worker.py")
RECIPES = ("rtn,gptq,sparsegpt24,sparsegpt24+gptq,wanda,wanda-owl,gptq-w8a8-static,awq+gptq,"
           "smoothquant+gptq-w8a8,gptq+kv,signround,signround-gptq,gptq+distill")
LIMIT = 240  # seconds a launch may take here (each rank imports torch and transformers)


def torchrun(n: int, *args: str, timeout: float = LIMIT, env: dict | None = None,
             module: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node n`` on this machine (loopback only)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={n}", *(["-m"] if module else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_sharded(tmp_path_factory.mktemp("dsrc") / "tiny", blocks=3)


@pytest.fixture(scope="module")
def runs(src, tmp_path_factory):
    """Every recipe by 1, 2 and 3 ranks with exact statistics, and by 3 without."""
    base = tmp_path_factory.mktemp("druns")
    out = {}
    for key, n, exact in (("1", 1, True), ("2", 2, True), ("3", 3, True), ("3-fast", 3, False)):
        out[key] = base / key
        _ok(torchrun(n, str(WORKER), str(out[key]), str(src), RECIPES,
                     *(["--exact"] if exact else [])))
    return out


@pytest.mark.parametrize("recipe", RECIPES.split(","))
def test_exact_statistics_give_the_same_checkpoint_on_any_number_of_ranks(runs, recipe):
    one = runs["1"] / recipe
    for n in ("2", "3"):
        assert_same_checkpoint(one, runs[n] / recipe)


def _perplexity(path: Path, ids: torch.Tensor) -> float:
    model, _ = llmc.load(path)
    with torch.no_grad():
        return float(torch.exp(model(input_ids=ids, labels=ids).loss))


@pytest.mark.parametrize("recipe", ["gptq", "sparsegpt24", "wanda-owl", "awq+gptq",
                                    "signround"])
def test_float32_statistics_agree_within_summation_order(runs, recipe):
    a, b = output_tensors(runs["1"] / recipe), output_tensors(runs["3-fast"] / recipe)
    assert set(a) == set(b)
    coded = [k for k in a if "layers" in k and k.endswith(("qweight", "proj.weight"))]
    same = sum(int((a[k] == b[k]).sum()) for k in coded)
    assert same / sum(a[k].numel() for k in coded) >= 0.999
    ids = calib_ids(4, 24, seed=7)
    pa, pb = _perplexity(runs["1"] / recipe, ids), _perplexity(runs["3-fast"] / recipe, ids)
    assert abs(pa - pb) / pa <= 1e-3


def test_kv_cache_scales_are_the_maximum_over_every_ranks_windows(runs):
    a, b = output_tensors(runs["1"] / "gptq+kv"), output_tensors(runs["3"] / "gptq+kv")
    scales = [k for k in a if k.endswith(("k_scale", "v_scale"))]
    assert len(scales) == 2 * 3  # every block's attention
    assert all(torch.equal(a[k], b[k]) for k in scales)


def test_mixture_of_experts_decides_fallbacks_on_every_ranks_tokens(tmp_path):
    """A Qwen2-MoE checkpoint (routed experts and a shared one) by 1 and 3 ranks: the same
    tensors, and the same tokens, rows and fallbacks per expert in the report, where each rank
    alone saw too few tokens for any expert to be solved from data."""
    from conftest import byte_tokenizer, tiny_model

    src = tmp_path / "moe"
    model = tiny_model("qwen2_moe")
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    for n in (1, 3):
        _ok(torchrun(n, str(WORKER), str(tmp_path / str(n)), str(src), "gptq-moe", "--exact"))
    assert_same_checkpoint(tmp_path / "1" / "gptq-moe", tmp_path / "3" / "gptq-moe")
    one, three = (json.loads((tmp_path / str(n) / "gptq-moe.experts.json").read_text())
                  for n in (1, 3))
    assert one == three and len(one) == model.config.num_hidden_layers * 4
    solved = [r for r in one if r["fallback"] is None]
    assert solved and all(r["tokens"] >= 100 for r in solved)
    assert all(r["fallback"] == ["gptq->rtn"] for r in one if r["tokens"] < 100)


def test_the_report_names_the_ranks_and_what_they_communicated(runs):
    engine = json.loads((runs["3"] / "gptq.engine.json").read_text())
    ranks = engine["distributed"]
    assert [r["rank"] for r in ranks] == [0, 1, 2] and all(r["world"] == 3 for r in ranks)
    assert all(r["bytes"] > 0 and r["backend"] == "gloo" for r in ranks)
    share = ranks[0]["solve_share"]
    assert len(share) == 3 and all(s > 0 for s in share) and abs(sum(share) - 1) < 1e-3
    assert engine["exact_stats"] is True


@pytest.mark.parametrize("recipe, ranks, again", [("gptq", 2, 3), ("awq+gptq", 3, 1),
                                                  ("signround", 3, 2), ("gptq+distill", 2, 1)])
def test_a_rank_that_dies_ends_every_rank_and_another_number_of_ranks_resumes(
        src, runs, tmp_path, recipe, ranks, again):
    from llmc.engine.stream import partial_dir, read_state

    scratch = tmp_path / "tmp"  # the dead rank's scratch directory stays behind, here
    scratch.mkdir()
    proc = torchrun(ranks, str(WORKER), str(tmp_path), str(src), recipe, "--exact",
                    "--die-at", "1", env={"LLMC_DIST_TIMEOUT": "60", "TMPDIR": str(scratch)},
                    timeout=180)
    assert proc.returncode != 0
    assert not (tmp_path / recipe).exists()  # no output
    state = read_state(partial_dir(tmp_path / recipe))
    assert state is not None and state["blocks_done"] == 1 and state["world"] == ranks
    _ok(torchrun(again, str(WORKER), str(tmp_path), str(src), recipe, "--exact", "--resume"))
    engine = json.loads((tmp_path / f"{recipe}.engine.json").read_text())
    assert engine["resumed_from_block"] == 1
    assert_same_checkpoint(runs["1"] / recipe, tmp_path / recipe)
    assert not partial_dir(tmp_path / recipe).exists()


def test_two_machines_rendezvous_and_match_one_process(src, runs, tmp_path):
    """Two torchrun agents, each a "machine" of one rank, meeting at a static rendezvous on
    the loopback address (what `--nnodes 2 --node-rank i --master-addr head` does)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={i}",
         "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
         str(WORKER), str(tmp_path), str(src), "gptq", "--exact"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in (0, 1)]
    try:
        logs = [p.communicate(timeout=LIMIT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    assert_same_checkpoint(runs["1"] / "gptq", tmp_path / "gptq")
    ranks = json.loads((tmp_path / "gptq.engine.json").read_text())["distributed"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)


def test_torchrun_dash_m_llmc_quantize_matches_one_process(src, tmp_path, text_file):
    common = ["quantize", str(src), "--method", "gptq", "--bits", "4", "--group-size", "32",
              "--dataset", str(text_file), "--samples", "8", "--seqlen", "24",
              "--batch-size", "2", "--dtype", "float32", "--exact-stats", "--quiet"]
    _ok(torchrun(2, "llmc", *common, "-o", str(tmp_path / "two"), module=True))
    one = subprocess.run([sys.executable, "-m", "llmc", *common, "-o", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=LIMIT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    _ok(one)
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")


# -- in one process ------------------------------------------------------------------------------

def _steps(recipe: dict) -> list:
    r = llmc.Recipe.coerce(recipe)
    return [(i, s, s.compressor()) for i, s in enumerate(r.steps)]


def test_a_block_transform_that_does_not_share_its_work_is_refused_first():
    from llmc.interfaces import TRANSFORM

    class Unshared:  # a plug-in transform that never said it reduces across ranks
        kind = TRANSFORM

    step = llmc.Recipe.coerce({"steps": [{"method": "gptq", "args": {}}]}).steps[0]
    with pytest.raises(ValueError, match="does not run over several processes"):
        check_distributed([(0, step, Unshared())])
    check_distributed(_steps({"steps": [  # every built-in one does
        {"method": "smoothquant"}, {"method": "awq", "args": {}},
        {"method": "signround", "args": {"bits": 4}},
        {"method": "distill", "args": {"mode": "block", "steps": 2}}]}))


def _rank(r: int, world: int) -> Distributed:
    return Distributed(r, world, "gloo", torch.device("cpu"))


def test_chunks_split_contiguously_and_every_rank_gets_one():
    split = [_rank(r, 3).chunk_range(7) for r in range(3)]
    assert split == [(0, 2), (2, 4), (4, 7)]
    ids = torch.arange(13).reshape(13, 1)  # 7 chunks of 2, the last short
    rows = torch.cat([_rank(r, 3).windows(ids, 2) for r in range(3)])
    assert torch.equal(rows, ids)
    with pytest.raises(ValueError, match="only 2 chunks"):
        _rank(0, 3).chunk_range(2)


def test_owners_balance_the_solve_and_agree_on_every_rank():
    costs = {"q": 4.0, "k": 1.0, "v": 1.0}
    a, b = _rank(0, 2), _rank(1, 2)
    assert a.owners(costs) == b.owners(costs) == {"q": 0, "k": 1, "v": 1}
    assert a.owners({"o": 4.0}) == {"o": 1}  # the rank with less work so far


def test_a_result_survives_packing():
    q = QuantScheme(4, 8)
    W = torch.randn(6, 16)
    from llmc.methods.rtn import rtn_compress

    qw, Wq = rtn_compress(W, q)
    res = CompressResult(Wq, qw, 0.25, 1.5, {"fallback": "rtn"}, mask=W > 0)
    tensors, meta = pack_result(res)
    back = unpack_result(tensors, meta, torch.device("cpu"))
    assert torch.equal(back.weight, res.weight) and torch.equal(back.mask, res.mask)
    assert back.mask.dtype == torch.bool
    for f in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back.quant, f), getattr(qw, f))
    assert (back.error, back.seconds, back.info) == (0.25, 1.5, {"fallback": "rtn"})
    assert back.quant.bits == 4 and back.quant.group_size == 8


@pytest.mark.parametrize("cls", [HessianStats, ColumnNormStats])
def test_exact_sums_do_not_depend_on_the_split(cls):
    g = torch.Generator().manual_seed(0)
    # magnitudes over 10^5 (products within 2^24 of each other: float64 sums stay exact)
    batches = [torch.randn(64, 48, generator=g) * 10 ** (i / 2) for i in range(-2, 4)]

    def total(parts: list[list[torch.Tensor]]) -> torch.Tensor:
        sums = []
        for part in parts:
            st = cls(48)
            st.make_exact()
            for x in part:
                st.add_batch(x)
            sums.append(st)
        first = sums[0]
        buf = first._upper if cls is HessianStats else first.sq
        for other in sums[1:]:
            buf += other._upper if cls is HessianStats else other.sq
            first.nsamples += other.nsamples
        return first.H if cls is HessianStats else first.norms

    one = total([batches])
    for split in ([batches[:2], batches[2:]], [batches[:1], batches[1:4], batches[4:]]):
        assert torch.equal(total(split), one)
