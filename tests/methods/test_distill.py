"""Distillation on tiny random models: the held-out KL goes down, pruned zeros stay zero,
quantized weights stay on their grid, the best state is kept (never worse than the start), and
the distilled model exports and loads back bit-exactly; the recipe step and the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_exports_exactly, calib_ids, tiny_model

import llmc
from llmc.methods.distill import DistillConfig, distill_logits, snapshot_teacher
from llmc.methods.distill.losses import hidden_loss, kl_loss, lm_loss, teacher_targets
from llmc.models import block_linears

JOINT = [{"method": "sparsegpt", "args": {"pattern": "2:4", "bits": 4, "group_size": 32}}]


def compressed(steps, seed=0):
    model = tiny_model("llama", seed)
    teacher = snapshot_teacher(model)
    model, _ = llmc.compress(model, {"steps": steps}, calibration=calib_ids(16, 32),
                             progress=False)
    return model, teacher


def linears(model):
    return {f"{b}.{n}": m for b, layer in enumerate(model.model.layers)
            for n, m in block_linears(layer).items()}


def test_losses():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 40, generator=g)
    logp, idx = teacher_targets(t, 2.0)
    assert idx is None and kl_loss(t, logp, idx, 2.0).abs() < 1e-6  # same logits: no loss
    s = torch.randn(2, 5, 40, generator=g)
    full = kl_loss(s, *teacher_targets(t, 1.0), 1.0)
    assert full > 0
    logp, idx = teacher_targets(t, 1.0, topk=40)  # all k: the same as the whole vocabulary
    torch.testing.assert_close(kl_loss(s, logp, idx, 1.0), full)
    logp, idx = teacher_targets(t, 1.0, topk=5)
    assert logp.shape == (2, 5, 5) and kl_loss(s, logp, idx, 1.0) > 0
    ids = torch.randint(0, 40, (2, 5), generator=g)
    assert lm_loss(s, ids) > 0


def test_distill_lowers_heldout_kl_keeps_zeros_and_grid():
    model, teacher = compressed(JOINT)
    before = {n: m.weight.detach().clone() for n, m in linears(model).items()}
    cfg = DistillConfig(steps=30, lr=1e-3, eval_every=10, batch_size=4)
    rec = distill_logits(model, teacher, calib_ids(32, 32, seed=5), calib_ids(8, 32, seed=9),
                         cfg, progress=False)
    assert rec["heldout_kl_best"] < rec["heldout_kl_start"] and rec["best_step"] > 0
    assert rec["layers"] == {"grid": 14}
    changed = 0
    for n, m in linears(model).items():
        assert type(m) is torch.nn.Linear and not m.weight.requires_grad
        assert torch.all(m.weight[before[n] == 0] == 0)  # every zero kept: still 2:4
        assert ((m.weight.reshape(-1, 4) != 0).sum(-1) <= 2).all()
        m.llmc_quant.codes(m.weight, n)  # raises when a weight left its grid
        changed += not torch.equal(m.weight, before[n])
    assert changed > 0


def test_pruned_zeros_stay_exactly_zero():
    model, teacher = compressed([{"method": "wanda", "args": {"sparsity": 0.5}}])
    before = {n: m.weight.detach().clone() for n, m in linears(model).items()}
    rec = distill_logits(model, teacher, calib_ids(32, 32, seed=5), calib_ids(8, 32, seed=9),
                         DistillConfig(steps=20, lr=1e-3, eval_every=5), progress=False)
    assert rec["layers"] == {"masked": 14} and rec["heldout_kl_best"] < rec["heldout_kl_start"]
    for n, m in linears(model).items():
        assert torch.all(m.weight[before[n] == 0] == 0)
        assert not torch.equal(m.weight, before[n])


def test_scales_only_keeps_codes():
    model, teacher = compressed([{"method": "gptq", "args": {"bits": 3, "group_size": 32}}])
    codes = {n: m.llmc_quant.codes(m.weight).q.clone() for n, m in linears(model).items()}
    scales = {n: m.llmc_quant.scales.clone() for n, m in linears(model).items()}
    rec = distill_logits(model, teacher, calib_ids(32, 32, seed=5), calib_ids(8, 32, seed=9),
                         DistillConfig(steps=30, lr=1e-2, eval_every=10, trainable="scales"),
                         progress=False)
    assert rec["layers"] == {"scales": 14}
    assert rec["heldout_kl_best"] < rec["heldout_kl_start"]
    moved = 0
    for n, m in linears(model).items():
        qw = m.llmc_quant.codes(m.weight, n)
        assert torch.equal(qw.q, codes[n])
        s = m.llmc_quant.scales
        assert torch.equal(s, s.half().float())  # what the writers store
        moved += not torch.equal(s, scales[n])
    assert moved > 0


def test_hidden_state_term():
    g = torch.Generator().manual_seed(0)
    hs = tuple(torch.randn(2, 5, 8, generator=g) for _ in range(3))
    assert hidden_loss(hs, hs) == 0
    assert hidden_loss((hs[0] + 1, *hs[1:]), hs) == 0  # the embeddings do not count
    assert hidden_loss((hs[0], hs[1] + 0.1, hs[2]), hs) > 0
    with pytest.raises(ValueError, match="hidden_weight is a logit-mode term"):
        DistillConfig(mode="block", hidden_weight=1.0)

    model, teacher = compressed([{"method": "wanda", "args": {"sparsity": 0.5}}])
    held = calib_ids(8, 32, seed=9)

    @torch.no_grad()
    def gap() -> float:
        s = model(input_ids=held, output_hidden_states=True).hidden_states
        return float(hidden_loss(s, teacher(input_ids=held, output_hidden_states=True)
                                 .hidden_states))

    start = gap()
    rec = distill_logits(model, teacher, calib_ids(32, 32, seed=5), held,
                         DistillConfig(steps=20, lr=1e-3, eval_every=5, hidden_weight=1.0),
                         progress=False)
    assert rec["heldout_kl_best"] < rec["heldout_kl_start"]
    assert gap() < 0.9 * start


def test_bf16_autocast_trains_and_stays_on_the_grid():
    with pytest.raises(ValueError, match="autocast must be"):
        DistillConfig(autocast="fp8")
    model, teacher = compressed(JOINT)
    rec = distill_logits(model, teacher, calib_ids(32, 32, seed=5), calib_ids(8, 32, seed=9),
                         DistillConfig(steps=20, lr=1e-3, eval_every=5, autocast="on"),
                         progress=False)
    assert rec["heldout_kl_best"] < rec["heldout_kl_start"]
    for n, m in linears(model).items():
        assert m.weight.dtype == torch.float32
        m.llmc_quant.codes(m.weight, n)  # still on its grid


def test_never_worse_than_the_start():
    model, teacher = compressed(JOINT)
    before = {n: m.weight.detach().clone() for n, m in linears(model).items()}
    rec = distill_logits(model, teacher, calib_ids(16, 32, seed=5), calib_ids(8, 32, seed=9),
                         DistillConfig(steps=6, lr=0.5, eval_every=2, grad_clip=0.0),
                         progress=False)  # a learning rate that only makes things worse
    assert rec["best_step"] == 0 and rec["heldout_kl_best"] == rec["heldout_kl_start"]
    for n, m in linears(model).items():
        assert torch.equal(m.weight, before[n])


def test_recipe_step_and_bit_exact_export(tmp_path):
    model = tiny_model("llama")
    recipe = {"steps": JOINT + [{"method": "distill",
                                 "args": {"steps": 10, "lr": 1e-3, "eval_every": 5,
                                          "heldout": 4}}]}
    model, report = llmc.compress(model, recipe, calibration=calib_ids(20, 32), progress=False)
    d = report.distill[0]
    assert d["train_windows"] == 16 and d["heldout_windows"] == 4 and d["step"] == 1
    assert d["heldout_kl_best"] <= d["heldout_kl_start"]
    assert_exports_exactly(model, report, tmp_path)


def test_distill_must_come_last():
    with pytest.raises(ValueError, match="after every compression step"):
        llmc.Recipe.from_dict({"steps": [{"method": "distill"}, {"method": "gptq"}]})
    with pytest.raises(ValueError, match="trainable"):
        llmc.Recipe.from_dict({"steps": [{"method": "distill", "args": {"trainable": "all"}}]})
    with pytest.raises(ValueError, match="leave none"):
        llmc.compress(tiny_model("llama"), {"steps": [{"method": "distill",
                                                        "args": {"heldout": 8}}]},
                      calibration=calib_ids(8, 32), progress=False)


def test_api_distill_of_a_loaded_checkpoint(tmp_path):
    model, teacher = compressed(JOINT)
    out = llmc.save(model, tmp_path / "student")
    student, _ = llmc.load(out)
    student, report = llmc.distill(student, copy.deepcopy(teacher),
                                   {"steps": [{"method": "distill",
                                               "args": {"steps": 10, "lr": 1e-3,
                                                        "eval_every": 5, "heldout": 4}}]},
                                   calibration=calib_ids(20, 32), progress=False)
    assert report.distill[0]["heldout_kl_best"] <= report.distill[0]["heldout_kl_start"]
    for n, m in linears(student).items():
        assert ((m.weight.reshape(-1, 4) != 0).sum(-1) <= 2).all()  # the zeros survived
        m.llmc_quant.codes(m.weight, n)
    with pytest.raises(ValueError, match="only hold distill steps"):
        llmc.distill(student, teacher, {"steps": [{"method": "gptq"}]},
                     calibration=calib_ids(20, 32))


BLOCK_WALKER = {"batch_size": 4, "dtype": "float32"}


def test_block_mode_lowers_each_blocks_heldout_error_and_keeps_zeros():
    model = tiny_model("llama")
    recipe = {"steps": [{"method": "wanda", "args": {"sparsity": 0.5}},
                        {"method": "distill", "args": {"mode": "block", "steps": 30,
                                                        "lr": 3e-4, "eval_every": 5,
                                                        "heldout": 4}}],
              "walker": BLOCK_WALKER}
    model, report = llmc.compress(model, recipe, calibration=calib_ids(16, 32), progress=False)
    blocks = [t for t in report.transforms if t["method"] == "distill"]
    assert [t["block"] for t in blocks] == [0, 1]
    for t in blocks:
        assert t["heldout_best"] < t["heldout_start"] and t["layers"] == {"masked": 7}
        assert t["train_windows"] == 12 and t["heldout_windows"] == 4
    for n, m in linears(model).items():
        assert abs(float((m.weight == 0).float().mean()) - 0.5) < 0.02, n
        assert not hasattr(m, "llmc_mask") and type(m) is torch.nn.Linear


def test_block_mode_that_keeps_its_start_changes_nothing():
    """A block whose best state is its start leaves the walk exactly as without the step: the
    next block is compressed on the same cached outputs."""
    steps = [{"method": "wanda", "args": {"sparsity": 0.5}}]
    plain, _ = llmc.compress(tiny_model("llama"), {"steps": steps, "walker": BLOCK_WALKER},
                             calibration=calib_ids(16, 32), progress=False)
    recipe = {"steps": steps + [{"method": "distill",
                                 "args": {"mode": "block", "steps": 2, "lr": 1e-12,
                                          "eval_every": 1, "heldout": 4}}],
              "walker": BLOCK_WALKER}
    model, report = llmc.compress(tiny_model("llama"), recipe, calibration=calib_ids(16, 32),
                                  progress=False)
    ref = dict(plain.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, ref[n]), n
    with pytest.raises(ValueError, match="block mode runs inside"):
        llmc.distill(model, plain, {"steps": [{"method": "distill", "args": {"mode": "block"}}]},
                     calibration=calib_ids(16, 32))
