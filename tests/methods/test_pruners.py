"""The pruners on one layer: exact sparsity, the ordering of their output errors, and pruning
composed with quantization (zeros stay zero, values on the grid)."""

import pytest
import torch

from llmc.core.scheme import output_error
from llmc.core.stats import HessianStats
from llmc.recipe import Step
from llmc.registry import METHODS


def layer(N=64, K=128, T=4096, seed=0):
    """A weight and calibration inputs with outlier channels and correlated columns."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(T, K, generator=g)
    X = Z + 0.9 * torch.roll(Z, 1, dims=1) + 0.5 * torch.roll(Z, 2, dims=1)
    X[:, torch.randperm(K, generator=g)[:6]] *= 12.0
    W = torch.randn(N, K, generator=g)
    return W, X


def run(method, W, X, mask=None, **args):
    comp = Step(method, args=args).compressor()
    st = comp.new_stats(W.shape[1])
    if st is not None:
        st.add_batch(X)
    return comp.compress("layer", W, st, mask=mask)


def hessian(X):
    st = HessianStats(X.shape[1])
    st.add_batch(X)
    return st.H


@pytest.mark.parametrize("args", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_sparsegpt_beats_wanda_beats_magnitude(args):
    W, X = layer()
    H = hessian(X)
    err = {m: output_error(W, run(m, W, X, **args).weight, H)
           for m in ("magnitude", "wanda", "sparsegpt")}
    assert err["sparsegpt"] < 0.95 * err["wanda"], err
    assert err["wanda"] < 0.95 * err["magnitude"], err


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("scope", ["row", "layer"])
def test_unstructured_sparsity_is_exact(method, scope):
    W, X = layer(N=24, K=200, T=512)
    res = run(method, W, X, sparsity=0.3, scope=scope)
    zeros = res.weight == 0
    assert torch.equal(zeros, ~res.mask)
    if scope == "row":
        assert (zeros.sum(dim=1) == round(0.3 * 200)).all()
    else:
        assert int(zeros.sum()) == round(0.3 * 24 * 200)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "3:5"])
def test_nm_holds_at_most_n_per_group(method, pattern):
    n, m = map(int, pattern.split(":"))
    W, X = layer(N=16, K=120, T=512)
    res = run(method, W, X, pattern=pattern)
    nonzero = (res.weight != 0).reshape(16, -1, m).sum(dim=-1)
    assert (nonzero <= n).all() and (res.mask.reshape(16, -1, m).sum(dim=-1) == n).all()


def test_sparsegpt_leaves_kept_weights_updated_and_others_zero():
    W, X = layer(N=16, K=64, T=512)
    res = run("sparsegpt", W, X, sparsity=0.5)
    assert not torch.equal(res.weight[res.mask], W[res.mask])  # OBS updates the kept ones
    assert (res.weight[~res.mask] == 0).all()


@pytest.mark.parametrize("args", [
    {"sparsity": 0.5, "scope": "row"}, {"pattern": "2:4"}, {"pattern": "2:4", "sym": False},
])
def test_joint_sparsegpt_quantization(args):
    W, X = layer(N=32, K=128, T=1024)
    res = run("sparsegpt", W, X, bits=4, group_size=32, **args)
    qw = res.quant
    assert torch.equal(qw.dequantize(), res.weight)  # every value on the grid
    g = qw.g_idx.long()
    assert torch.equal(qw.q[~res.mask].long(), qw.zeros[:, g][~res.mask].long())
    assert (res.weight[~res.mask] == 0).all()
    assert (~res.mask).float().mean() == pytest.approx(0.5)
    # the joint pass beats pruning then rounding to nearest
    H = hessian(X)
    pruned = run("sparsegpt", W, X, **{k: v for k, v in args.items() if k != "sym"}).weight
    rtn = run("rtn", pruned, X, bits=4, group_size=32, sym=args.get("sym", True)).weight
    assert output_error(W, res.weight, H) < output_error(W, rtn, H)


def test_joint_sparsegpt_without_data_prunes_by_magnitude_then_rounds():
    # the fallback of a starved MoE expert (it once passed clip=False to RTN and crashed)
    W, _ = layer(N=32, K=128)
    comp = Step("sparsegpt", args={"pattern": "2:4", "bits": 4, "group_size": 32}).compressor()
    res = comp.compress_without_data("layer", W)
    assert res.info["fallback"] == "magnitude+rtn"
    assert torch.equal(res.quant.dequantize(), res.weight)
    assert (res.weight[~res.mask] == 0).all()
    kept = res.mask.reshape(32, -1, 4)
    assert (kept.sum(-1) == 2).all()
    assert torch.equal(kept, W.abs().reshape(32, -1, 4).argsort(-1).argsort(-1) >= 2)


@pytest.mark.parametrize("quantizer", ["gptq", "rtn"])
@pytest.mark.parametrize("act_order", ["none", "static", "dynamic"])
def test_quantization_after_pruning_keeps_zeros(quantizer, act_order):
    W, X = layer(N=32, K=128, T=1024)
    pruned = run("wanda", W, X, pattern="2:4")
    args = {"bits": 4, "group_size": 32}
    if quantizer == "gptq":
        args["act_order"] = act_order
    res = run(quantizer, pruned.weight, X, mask=pruned.mask, **args)
    assert (res.weight[~pruned.mask] == 0).all()
    assert torch.equal(res.quant.dequantize(), res.weight)
    if quantizer == "gptq":
        H = hessian(X)
        rtn = run("rtn", pruned.weight, X, mask=pruned.mask, bits=4, group_size=32).weight
        assert output_error(W, res.weight, H) < output_error(W, rtn, H)


def test_gptq_without_the_mask_would_fill_the_zeros():
    """The masked run is not vacuous: the same GPTQ unmasked moves pruned entries."""
    W, X = layer(N=32, K=128, T=1024)
    pruned = run("wanda", W, X, sparsity=0.5)
    res = run("gptq", pruned.weight, X, bits=4, group_size=32)
    assert (res.weight[~pruned.mask] != 0).any()


def test_pruners_registered_with_their_defaults():
    assert METHODS.get("magnitude").make_config({}).scope == "layer"
    assert METHODS.get("wanda").make_config({}).scope == "row"
    assert METHODS.get("sparsegpt").make_config({}).scope == "layer"
    with pytest.raises(ValueError, match="unknown key.*valid"):
        METHODS.get("wanda").make_config({"ratio": 0.5})
