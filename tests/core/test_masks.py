"""Pruning masks and the pruners' arguments."""

import pytest
import torch

from llmc.core.masks import nm_keep, parse_pattern, smallest_mask, unstructured_keep
from llmc.methods.owl import outlier_ratio, owl_sparsities
from llmc.methods.prune import PruneArgs
from llmc.methods.sparsegpt import SparseGPTConfig


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_unstructured_row_and_layer_sparsity_is_exact(sparsity):
    scores = torch.rand(37, 91)
    keep = unstructured_keep(scores, sparsity, "row")
    assert ((~keep).sum(dim=1) == round(sparsity * 91)).all()
    # the pruned entries of a row are its lowest scores
    for r in range(0, 37, 9):
        assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()
    keep = unstructured_keep(scores, sparsity, "layer")
    assert int((~keep).sum()) == round(sparsity * 37 * 91)
    assert scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3), (5, 8)])
def test_nm_keeps_the_n_largest_of_every_m(n, m):
    scores = torch.rand(16, 24 * m // m * m)
    keep = nm_keep(scores, n, m)
    groups = keep.reshape(16, -1, m)
    assert (groups.sum(dim=-1) == n).all()
    s = scores.reshape(16, -1, m)
    kept_min = torch.where(groups, s, torch.inf).amin(dim=-1)
    pruned_max = torch.where(~groups, s, -torch.inf).amax(dim=-1)
    assert (pruned_max <= kept_min).all()


def test_nm_refuses_ragged_widths():
    with pytest.raises(ValueError, match="groups of 4"):
        nm_keep(torch.rand(4, 10), 2, 4)


def test_smallest_mask_counts():
    s = torch.rand(5, 7)
    assert smallest_mask(s, 0).sum() == 0
    assert (smallest_mask(s, 3, "row").sum(dim=1) == 3).all()
    assert smallest_mask(s, 11, "layer").sum() == 11


@pytest.mark.parametrize("pattern,message", [
    ("2-4", "not N:M"), ("4:4", "0 < N < M"), ("0:4", "0 < N < M"),
])
def test_bad_patterns(pattern, message):
    with pytest.raises(ValueError, match=message):
        parse_pattern(pattern)


@pytest.mark.parametrize("args,message", [
    ({"sparsity": 1.0}, r"sparsity: 1.0 must lie in \[0, 1\)"),
    ({"scope": "column"}, "scope"),
    ({"pattern": "2:4", "owl": True}, "unstructured sparsity only"),
    ({"layer_sparsity": {"down_proj": 1.5}}, "layer_sparsity"),
    ({"layer_sparsity": {"re:(": 0.5}}, "bad regular expression"),
])
def test_bad_prune_args(args, message):
    with pytest.raises(ValueError, match=message):
        PruneArgs(**args)


def test_sparsegpt_config_checks():
    with pytest.raises(ValueError, match="wider than block_size"):
        SparseGPTConfig(pattern="2:16", block_size=8)
    with pytest.raises(ValueError, match="bits"):
        SparseGPTConfig(bits=9)
    assert SparseGPTConfig().scheme is None
    assert SparseGPTConfig(bits=4, group_size=64).scheme.group_size == 64


def test_layer_sparsity_overrides_the_block_ratio():
    a = PruneArgs(sparsity=0.5, layer_sparsity={"re:mlp\\.down": 0.2, "q_proj": 0.7})
    assert a.sparsity_for("model.layers.3.mlp.down_proj") == 0.2
    assert a.sparsity_for("model.layers.3.self_attn.q_proj", 0.45) == 0.7
    assert a.sparsity_for("model.layers.3.self_attn.k_proj", 0.45) == 0.45
    assert a.sparsity_for("model.layers.3.self_attn.k_proj") == 0.5


def test_owl_ratios_average_to_the_target_within_lambda():
    ratios = [0.01, 0.03, 0.02, 0.08, 0.05]
    sp = owl_sparsities(ratios, 0.6, 0.08)
    assert sum(sp) / len(sp) == pytest.approx(0.6)
    assert max(sp) - min(sp) == pytest.approx(0.16)
    # more outliers, lower sparsity
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [sp[i] for i in order] == sorted(sp, reverse=True)
    assert owl_sparsities([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]


def test_outlier_ratio():
    s = [torch.ones(10, 10), torch.ones(5, 4)]
    s[0][0, 0] = 100.0
    mean = (99 + 100 + 20) / 120
    assert outlier_ratio(s, 5.0) == pytest.approx(1 / 120)
    assert outlier_ratio(s, 100 / mean + 1) == 0.0
