"""The layer walker on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, calib_ids, tiny_config, tiny_model

import llmc
from llmc.core.scheme import output_error
from llmc.models import get_adapter


def recipe(seq: bool = True, dtype: str = "float32", batch: int = 3, **args) -> dict:
    return {"steps": [{"method": "gptq",
                       "args": {"bits": 4, "group_size": 32, "true_sequential": seq, **args}}],
            "walker": {"batch_size": batch, "dtype": dtype}}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seq", [True, False])
def test_every_architecture_walks(arch, seq):
    x = calib_ids(7, 24)  # 7 windows in chunks of 3: a short last chunk
    ref_logits = tiny_model(arch)(x).logits
    model, report = llmc.compress(tiny_model(arch), recipe(seq), calibration=x, progress=False)
    linears = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert sorted(r["name"] for r in report.layers) == sorted(linears)
    for name in linears:
        m = model.get_submodule(name)
        assert torch.equal(m.weight.data, m.llmc_quant.codes(m.weight).dequantize())
    assert not hasattr(model.lm_head, "llmc_quant")
    assert len(report.blocks) == 2
    assert all(0 <= r["error"] < 0.1 for r in report.layers)
    rel = (model(x).logits - ref_logits).norm() / ref_logits.norm()
    assert 0 < rel < 0.5


def test_gptq_walk_beats_rtn_on_calibration_loss():
    x = calib_ids(8, 32)
    fp = tiny_model("llama")
    target = fp(x).logits.log_softmax(-1)

    def kl(model):
        return torch.nn.functional.kl_div(model(x).logits.log_softmax(-1), target,
                                          log_target=True, reduction="batchmean").item()

    rtn, _ = llmc.compress(tiny_model("llama"),
                           {"steps": [{"method": "rtn", "args": {"bits": 3, "group_size": 32}}]},
                           progress=False)
    gptq, _ = llmc.compress(tiny_model("llama"), recipe(bits=3), calibration=x, progress=False)
    assert kl(gptq) < 0.95 * kl(rtn)


def test_chunking_does_not_change_sequential_result():
    """One chunk (no thread switching) and many chunks give the same compressed weights."""
    x = calib_ids(6, 24)
    a, _ = llmc.compress(tiny_model("llama"), recipe(batch=6), calibration=x, progress=False)
    b, _ = llmc.compress(tiny_model("llama"), recipe(batch=2), calibration=x, progress=False)
    for (n, ma), mb in zip(a.named_modules(), b.modules()):
        if hasattr(ma, "llmc_quant"):
            qa, qb = ma.llmc_quant.codes(ma.weight).q, mb.llmc_quant.codes(mb.weight).q
            differ = (qa != qb).float().mean().item()
            assert differ < 0.01, n


def test_tail_deferral_is_exact(monkeypatch):
    """down_proj's outputs added after the pass (the tail) equal the plain lockstep walk's, in
    bf16 too: the same weights and the same block outputs, bit for bit."""
    import dataclasses

    from llmc import models

    x = calib_ids(7, 24)
    for dtype in ("float32", "bfloat16"):
        a, _ = llmc.compress(tiny_model("llama"), recipe(dtype=dtype), calibration=x,
                             progress=False)
        monkeypatch.setitem(models.OVERRIDES, "llama",
                            lambda a: dataclasses.replace(a, tail=None))
        b, _ = llmc.compress(tiny_model("llama"), recipe(dtype=dtype), calibration=x,
                             progress=False)
        monkeypatch.undo()
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa, pb), (dtype, n)


def test_true_sequential_sees_compressed_inputs():
    """o_proj's Hessian in the sequential walk comes from the compressed q/k/v: recompute it by
    hand from a model whose q/k/v carry the compressed weights."""
    x = calib_ids(4, 16)
    seq, rep_seq = llmc.compress(tiny_model("llama"), recipe(batch=2), calibration=x,
                                 progress=False)
    base = tiny_model("llama")
    attn, attn_q = base.model.layers[0].self_attn, seq.model.layers[0].self_attn
    for n in ("q_proj", "k_proj", "v_proj"):
        getattr(attn, n).weight.data.copy_(getattr(attn_q, n).weight.data)
    inputs = []
    h = attn.o_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    base(x)
    h.remove()
    X = torch.cat(inputs).reshape(-1, 64)
    H = 2 * X.T @ X / X.shape[0]
    W0 = tiny_model("llama").model.layers[0].self_attn.o_proj.weight.data
    err = output_error(W0, attn_q.o_proj.weight.data, H)
    rec = next(r for r in rep_seq.layers if r["name"] == "model.layers.0.self_attn.o_proj")
    assert err == pytest.approx(rec["error"], rel=1e-3)


def test_bf16_walk_close_to_fp32():
    x = calib_ids(6, 24)
    a, _ = llmc.compress(tiny_model("llama"), recipe(dtype="float32"), calibration=x,
                         progress=False)
    b, _ = llmc.compress(tiny_model("llama"), recipe(dtype="bfloat16"), calibration=x,
                         progress=False)
    la, lb = a(x).logits, b(x).logits
    assert b.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert (la - lb).norm() / la.norm() < 0.1


def test_targets_and_ignore():
    x = calib_ids(4, 16)
    r = {"steps": [{"method": "gptq", "targets": ["re:mlp\\."], "ignore": ["down_proj"],
                    "args": {"group_size": 32}}], "walker": {"dtype": "float32"}}
    model, report = llmc.compress(tiny_model("llama"), r, calibration=x, progress=False)
    names = {r["name"].split(".", 3)[-1] for r in report.layers}
    assert names == {"mlp.gate_proj", "mlp.up_proj"}
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "llmc_quant")


def test_two_steps_compose_in_one_walk():
    x = calib_ids(4, 16)
    r = {"steps": [{"method": "gptq", "targets": ["re:self_attn"], "args": {"group_size": 32}},
                   {"method": "rtn", "targets": ["re:mlp"], "args": {"bits": 8, "group_size": 32}}],
         "walker": {"dtype": "float32"}}
    model, report = llmc.compress(tiny_model("llama"), r, calibration=x, progress=False)
    assert {r["method"] for r in report.layers} == {"gptq", "rtn"}
    assert model.model.layers[1].mlp.up_proj.llmc_quant.bits == 8


def test_a_new_llama_like_architecture_needs_no_code():
    cfg = tiny_config("llama")
    cfg.model_type = "mystery"
    a = get_adapter(cfg)
    assert a.name == "mystery" and a.tail == "mlp.down_proj" and len(a.scale_pairs) == 4


def test_an_unreadable_architecture_says_what_was_not_found():
    from transformers import PretrainedConfig

    class Strange(PretrainedConfig):
        model_type = "strange"

    with pytest.raises(ValueError, match="architecture 'strange': could not build a small copy"):
        get_adapter(Strange())


def test_interrupt_in_a_chunk_thread_propagates():
    x = calib_ids(6, 16)
    model = tiny_model("llama")
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    model.model.layers[0].mlp.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        llmc.compress(model, recipe(batch=2), calibration=x, progress=False)


def test_non_float32_blocks_are_refused():
    model = tiny_model("llama").to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        llmc.compress(model, recipe(), calibration=calib_ids(4, 16), progress=False)


@pytest.mark.parametrize("arch", ["opt", "qwen2"])
def test_save_load_with_biases_is_exact(arch, tmp_path):
    """OPT and Qwen2 Linears carry biases: the checkpoint reproduces the logits exactly."""
    x = calib_ids(4, 16)
    model, _ = llmc.compress(tiny_model(arch), recipe(), calibration=x, progress=False)
    llmc.save(model, tmp_path / "m")
    back, _ = llmc.load(tmp_path / "m")
    torch.testing.assert_close(back(x).logits, model(x).logits, rtol=0, atol=0)


def test_partial_quantization_names_the_quantized_modules(tmp_path):
    import json

    r = {"steps": [{"method": "gptq", "targets": ["re:self_attn"], "args": {"group_size": 32}}],
         "walker": {"dtype": "float32"}}
    model, _ = llmc.compress(tiny_model("llama"), r, calibration=calib_ids(4, 16),
                             progress=False)
    llmc.save(model, tmp_path / "m")
    q = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert q["modules_in_block_to_quantize"] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    back, _ = llmc.load(tmp_path / "m")
    up, up_back = model.model.layers[0].mlp.up_proj, back.model.layers[0].mlp.up_proj
    assert torch.equal(up_back.weight, up.weight)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("act_type", ["int", "float"])
def test_static_activation_scales_are_the_calibrated_ranges(method, act_type):
    """A static scheme's one scale per Linear is ``max |x| / 127`` (INT8) or ``/ 448`` (FP8)
    over the inputs that Linear saw in the walk: through the earlier Linears of its block
    already quantized, their inputs quantized too."""
    from llmc.core.act import FP8_MAX, INT8_MAX

    args = {"bits": 8, "group_size": -1, "act_bits": 8, "act_type": act_type,
            "act_strategy": "tensor", "act_dynamic": False}
    x = calib_ids()
    model, _ = llmc.compress(tiny_model("llama"), {"steps": [{"method": method, "args": args}],
                                                   "walker": {"dtype": "float32"}},
                             calibration=x, progress=False)
    seen = {}
    linears = {n: m for n, m in model.named_modules() if hasattr(m, "llmc_act_scale")}
    assert len(linears) == 14  # every block Linear, not the head
    hooks = [m.register_forward_pre_hook(
        lambda mod, inp, n=n: seen.__setitem__(n, inp[0].abs().amax()), prepend=True)
        for n, m in linears.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    qmax = INT8_MAX if act_type == "int" else FP8_MAX
    for n, m in linears.items():
        assert m.llmc_act.dynamic is False and m.llmc_act_scale.shape == (1,)
        torch.testing.assert_close(m.llmc_act_scale[0], seen[n] / qmax, rtol=1e-4, atol=0,
                                   msg=n)
