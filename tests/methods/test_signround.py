"""SignRound (learned rounding) on tiny random models: its grid at the start is RTN's (or
GPTQ's) exactly, learning lowers each block's held-out output error and never ends above the
start, the result sits on its grid and exports bit-exactly, pruned zeros stay zero, and the
recipe, CLI and config refuse what they cannot do."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_exports_exactly, calib_ids, tiny_model

import llmc
from llmc.core.scheme import QuantScheme
from llmc.core.stats import HessianStats
from llmc.methods import signround as signround_module
from llmc.methods.gptq import gptq_quantize
from llmc.methods.rtn import rtn_compress
from llmc.methods.signround import LearnedGrid, SignRoundConfig, _rows, _sampling_refused
from llmc.models import block_linears

W = {"batch_size": 4, "dtype": "float32"}


def signround(bits=3, group=32, **args):
    return {"method": "signround", "args": {"bits": bits, "group_size": group, "iters": 20,
                                            "heldout": 4, "eval_every": 5, **args}}


def linears(model):
    return {f"{b}.{n}": m for b, layer in enumerate(model.model.layers)
            for n, m in block_linears(layer).items()}


@pytest.mark.parametrize("sym,full", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("group", [32, 24, -1])  # 24: a narrow last group of 64 columns
def test_grid_starts_at_round_to_nearest(sym, full, group):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 64, generator=g) * 0.05
    W[3, :24] = 0  # an all-zero group
    scheme = QuantScheme(3, group, sym, full_range=full)
    grid = LearnedGrid(W, scheme, None, 0.5, True)
    ref_q, ref_W = rtn_compress(W, scheme)
    assert (ref_q.scales < 0).any() == full
    W1, state = grid.final()
    assert torch.equal(W1, ref_W)
    assert torch.equal(state.scales, ref_q.scales) and torch.equal(state.zeros, ref_q.zeros)
    assert torch.equal(state.codes(W1).q, ref_q.q)


@pytest.mark.parametrize("full", [False, True])
def test_grid_starts_at_gptq(full):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 64, generator=g) * 0.05
    st = HessianStats(64)
    st.add_batch(torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3, 64))
    scheme = QuantScheme(3, 32, True, full_range=full)
    qw = gptq_quantize(W, st.H, scheme)
    grid = LearnedGrid(W, scheme, None, 0.2, True)
    grid.start_from(qw)
    W1, state = grid.final()
    assert torch.equal(state.scales, qw.scales.float())
    assert torch.equal(W1, qw.dequantize())


def test_offsets_move_the_rounding_and_gradients_reach_them():
    W = torch.tensor([[0.26, 0.1, 0.1, 0.1]])  # 0.1 / s = 0.58: rounds up, or down from v -0.5
    grid = LearnedGrid(W, QuantScheme(2, -1, True), None, 0.5, False)
    (grid().sum()).backward()
    assert grid.v.grad is not None and grid.v.grad.abs().sum() > 0
    before = grid.offsets().clone()
    with torch.no_grad():
        grid.v[..., 1] = -0.5
    assert (grid.offsets() != before).sum() == 1


def test_walk_lowers_heldout_error_never_worse_and_exports_bit_exactly(tmp_path):
    model = tiny_model("llama")
    model, report = llmc.compress(model, {"steps": [signround()], "walker": W},
                                  calibration=calib_ids(16, 32), progress=False)
    records = [t for t in report.transforms if t["method"] == "signround"]
    assert len(records) == 2
    for r in records:
        assert r["heldout_best"] <= r["heldout_start"]
        assert r["train_windows"] == 12 and r["heldout_windows"] == 4 and r["iters"] == 20
    assert any(r["heldout_best"] < 0.95 * r["heldout_start"] and r["moved"] > 0 for r in records)
    for n, m in linears(model).items():
        assert m.llmc_quant.bits == 3 and not m.weight.requires_grad
        m.llmc_quant.codes(m.weight.data, n)  # on its grid
    assert_exports_exactly(model, report, tmp_path)


def test_beats_rtn_on_the_blocks_own_error():
    """The held-out error at step 0 is RTN's; learning must end below it on every block here,
    and the GPTQ start must begin below RTN's (on block 0, whose inputs both runs share)."""
    x = calib_ids(16, 32)
    _, rep = llmc.compress(tiny_model("llama"), {"steps": [signround(iters=40)], "walker": W},
                           calibration=x, progress=False)
    _, rep_g = llmc.compress(tiny_model("llama"),
                             {"steps": [signround(iters=5, init="gptq")], "walker": W},
                             calibration=x, progress=False)
    for r in rep.transforms:
        assert r["heldout_best"] < r["heldout_start"]
    r, g = rep.transforms[0], rep_g.transforms[0]
    assert g["heldout_start"] < r["heldout_start"] and g["init"] == "gptq"


def test_after_pruning_zeros_stay_zero_and_after_awq():
    x = calib_ids(16, 32)
    steps = [{"method": "sparsegpt", "args": {"pattern": "2:4"}}, signround(4)]
    model, _ = llmc.compress(tiny_model("llama"), {"steps": steps, "walker": W}, calibration=x,
                             progress=False)
    for n, m in linears(model).items():
        groups = (m.weight.data != 0).reshape(m.weight.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all(), n
        assert m.llmc_sparsity["structure"] == "2:4" and m.llmc_quant.bits == 4
    steps = [{"method": "awq", "args": {"bits": 3, "group_size": 32}}, signround()]
    recipe = llmc.Recipe.from_dict({"steps": steps, "walker": W})
    assert [s.method for s in recipe.steps] == ["awq", "signround"]  # no RTN step added
    model, rep = llmc.compress(tiny_model("llama"), recipe, calibration=x, progress=False)
    assert [t["method"] for t in rep.transforms] == ["awq", "signround"] * 2
    with pytest.raises(ValueError, match="same bits"):
        llmc.Recipe.from_dict({"steps": [{"method": "awq", "args": {"bits": 4}},
                                         signround(3)]})


def test_token_sample_runs_the_mlp_on_the_sample_only(monkeypatch):
    """With ``tokens: 0.25`` each training step's MLP sees a quarter of the chunk's rows (the
    held-out checks all of them), attention all of them, and learning still lowers the error."""
    model = tiny_model("llama")
    rows: list[int] = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]))
    _, rep = llmc.compress(model, {"steps": [signround(tokens=0.25)], "walker": W},
                           calibration=calib_ids(16, 32), progress=False)
    n = 4 * 32
    assert set(rows) == {n, n // 4}  # training steps on the sample, the rest on every token
    assert rows.count(n // 4) == 2 * (20 + 1)  # per block: 20 steps and the exactness check
    for r in rep.transforms:
        assert r["tokens"] == 0.25 and "tokens_refused" not in r
        assert r["heldout_best"] < r["heldout_start"]
    # a token-wise part that cannot run on a sample: every token, and the report says why
    monkeypatch.setattr(signround_module, "_tokenwise_parts",
                        lambda ctx: [ctx.block.self_attn])
    _, rep = llmc.compress(tiny_model("llama"),
                           {"steps": [signround(tokens=0.25, iters=2)], "walker": W},
                           calibration=calib_ids(16, 32), progress=False)
    assert all(r["tokens"] == 1.0 and "cannot run on a sample" in r["tokens_refused"]
               for r in rep.transforms)


def test_sampling_refused_when_the_sampled_outputs_differ():
    full = torch.randn(2, 8, 4)
    sel = torch.tensor([1, 5, 9])

    def exact(c, s):
        return full if s is None else _rows(full, s)

    assert _sampling_refused(exact, 0, sel) is None
    why = _sampling_refused(lambda c, s: exact(c, s) * (1.01 if s is not None else 1), 0, sel)
    assert why and "differs" in why


def test_compressed_target_and_config_errors():
    model, rep = llmc.compress(tiny_model("llama"),
                               {"steps": [signround(target="compressed", iters=5)], "walker": W},
                               calibration=calib_ids(16, 32), progress=False)
    assert all(t["target"] == "compressed" and t["heldout_best"] <= t["heldout_start"]
               for t in rep.transforms)
    assert SignRoundConfig(preset="fast").steps == 50 and SignRoundConfig().step_lr == 1 / 200
    for bad, match in [({"type": "float", "bits": 8, "group_size": -1}, "integer"),
                       ({"act_bits": 8}, "weights only"), ({"preset": "slow"}, "preset"),
                       ({"init": "awq"}, "init"), ({"target": "teacher"}, "target"),
                       ({"min_range": 0}, "min_range"), ({"iters": -1}, "iters"),
                       ({"tokens": 1.5}, "fraction")]:
        with pytest.raises(ValueError, match=match):
            SignRoundConfig(**bad)
    with pytest.raises(ValueError, match="two chunks"):
        llmc.compress(tiny_model("llama"), {"steps": [signround()], "walker": W},
                      calibration=calib_ids(4, 32), progress=False)


def test_cli(model_dir, text_file, tmp_path):
    from test_cli import calib_flags, run

    out = tmp_path / "sr"
    flags = calib_flags(text_file)
    flags[flags.index("--samples") + 1] = 12
    run("quantize", model_dir, "--method", "signround", "--bits", 3, "--group-size", 32,
        "--iters", 3, "--init", "gptq", "--tokens", 0.5, "--batch-size", 4, *flags, "-o", out)
    model, _ = llmc.load(out)
    assert model.model.layers[0].mlp.down_proj.llmc_quant.bits == 3
    recipe = llmc.Recipe.from_yaml(out / "recipe.yaml")
    cfg = recipe.steps[0].config
    assert cfg.iters == 3 and cfg.init == "gptq" and cfg.tokens == 0.5
    res = run("quantize", model_dir, "--method", "gptq", "--iters", 3, "-o", tmp_path / "x",
              ok=False)
    assert res.exit_code != 0 and "signround" in res.output
