"""Streaming a checkpoint through the engine: the same tensors as the in-memory path, from
sharded safetensors and from GGUF, in every cache placement and lockstep mode."""

from __future__ import annotations

import pytest
import torch
from checkpoints import assert_same_checkpoint, output_tensors, write_gguf, write_sharded
from conftest import calib_ids

import llmc
from llmc.models import load_model

W = {"batch_size": 3, "dtype": "bfloat16"}
RECIPES = {
    "rtn": {"steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 32}}]},
    "gptq": {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 32}}], "walker": W},
    "awq+gptq": {"steps": [{"method": "awq", "args": {"bits": 4, "group_size": 32}},
                           {"method": "gptq", "args": {"bits": 4, "group_size": 32}}],
                 "walker": W},
    "sparsegpt24+gptq": {"steps": [{"method": "sparsegpt", "args": {"pattern": "2:4"}},
                                   {"method": "gptq", "args": {"bits": 4, "group_size": 32}}],
                         "walker": W},
    "block-distill": {"steps": [{"method": "gptq", "args": {"bits": 3, "group_size": 32}},
                                {"method": "distill",
                                 "args": {"mode": "block", "steps": 3, "lr": 1e-4,
                                          "heldout": 2, "eval_every": 1}}],
                      "walker": {"batch_size": 2, "dtype": "float32"}},
    "awq+signround": {"steps": [{"method": "awq", "args": {"bits": 3, "group_size": 32}},
                                {"method": "signround",
                                 "args": {"bits": 3, "group_size": 32, "iters": 3, "heldout": 2,
                                          "eval_every": 1}}],
                      "walker": {"batch_size": 2, "dtype": "float32"}},
    "sparsegpt50": {"steps": [{"method": "sparsegpt", "args": {"sparsity": 0.5}}],
                    "walker": W},
    "smoothquant+gptq-w8a8": {"steps": [{"method": "smoothquant"},
                                        {"method": "gptq", "args": {"bits": 8, "group_size": -1,
                                                                    "act_bits": 8}}],
                              "walker": W},
    "fp8-dynamic": {"steps": [{"method": "rtn", "args": {"bits": 8, "group_size": -1,
                                                         "type": "float", "act_bits": 8,
                                                         "act_type": "float"}}]},
    "gptq+kv-fp8": {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 32}}],
                    "kv_cache": {"strategy": "attn_head"}, "walker": W},
    "rtn+kv-fp8": {"steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 32}}],
                   "kv_cache": {}},
    "mixed-fp8-attn+w4-mlp": {"steps": [
        {"method": "gptq", "targets": ["re:.*self_attn.*"],
         "args": {"bits": 8, "group_size": -1, "type": "float", "act_bits": 8,
                  "act_type": "float"}},
        {"method": "gptq", "targets": ["re:.*mlp.*"], "args": {"bits": 4, "group_size": 32}}],
        "walker": W},
    # data-free steps in sequence: each Linear's last one gives its codes alone
    "rtn-mixed-bits": {"steps": [
        {"method": "rtn", "targets": ["re:.*self_attn.*"], "args": {"bits": 8, "group_size": -1}},
        {"method": "rtn", "targets": ["re:.*mlp.*"], "args": {"bits": 4, "group_size": 32}}]},
    "magnitude24+rtn": {"steps": [{"method": "magnitude", "args": {"pattern": "2:4"}},
                                  {"method": "rtn", "args": {"bits": 4, "group_size": 32}}]},
    "w8a8-static-rtn": {"steps": [{"method": "rtn", "args": {
        "bits": 8, "group_size": -1, "act_bits": 8, "act_strategy": "tensor",
        "act_dynamic": False}}]},
}


def in_memory(src, recipe, out, calibration, fmt=None):
    """The reference: the whole model loaded, compressed resident, then saved."""
    model, tok = load_model(str(src))
    model, report = llmc.compress(model, recipe, calibration=calibration, progress=False)
    llmc.save(model, out, tokenizer=tok, format=fmt)
    return report


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return write_sharded(tmp_path_factory.mktemp("src") / "tiny", blocks=3)


@pytest.mark.parametrize("name", list(RECIPES))
def test_stream_equals_in_memory(sharded, tmp_path, name):
    x = calib_ids(7, 24)
    out, report = llmc.compress(str(sharded), RECIPES[name], calibration=x, out=tmp_path / "s",
                                progress=False, device="cpu")
    in_memory(sharded, RECIPES[name], tmp_path / "m", x)
    assert_same_checkpoint(out, tmp_path / "m")
    assert report.engine["streaming"] is True
    assert (out / "recipe.yaml").is_file() and (out / "llmc_report.json").is_file()
    assert (out / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial left


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_stream_equals_in_memory_other_layouts(sharded, tmp_path, fmt):
    x = calib_ids(7, 24)
    recipe = RECIPES["gptq"] if fmt == "awq" else RECIPES["sparsegpt24+gptq"]
    out, _ = llmc.compress(str(sharded), recipe, calibration=x, out=tmp_path / "s",
                           progress=False, device="cpu", format=fmt)
    in_memory(sharded, recipe, tmp_path / "m", x, fmt=fmt)
    assert_same_checkpoint(out, tmp_path / "m")


@pytest.mark.parametrize("name,masters", [("rtn", "as stored"), ("fp8-dynamic", "as stored"),
                                          ("rtn-mixed-bits", "float32"),
                                          ("w8a8-static-rtn", "float32"), ("gptq", "float32")])
def test_one_data_free_step_reads_blocks_as_stored(sharded, tmp_path, name, masters):
    """RTN alone never casts a block to float32 (nor builds a dequantized weight); a walk with
    forwards, or with several steps on one Linear, works on float32 masters."""
    _, report = llmc.compress(str(sharded), RECIPES[name], calibration=calib_ids(7, 24),
                              out=tmp_path / "s", progress=False, device="cpu")
    assert report.engine["masters"] == masters


def test_unquantized_tensors_keep_the_checkpoint_dtype(sharded, tmp_path):
    out, _ = llmc.compress(str(sharded), RECIPES["rtn"], out=tmp_path / "s", progress=False)
    t = output_tensors(out)
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16


@pytest.mark.parametrize("cache,lockstep", [("disk", "lockstep"), ("ram", "replay"),
                                            ("disk", "replay")])
def test_cache_place_and_lockstep_mode_give_the_same_tensors(sharded, tmp_path, cache,
                                                              lockstep):
    x = calib_ids(7, 24)
    ref, r0 = llmc.compress(str(sharded), RECIPES["gptq"], calibration=x, out=tmp_path / "ref",
                            progress=False, cache="ram", lockstep="lockstep")
    out, report = llmc.compress(str(sharded), RECIPES["gptq"], calibration=x,
                                out=tmp_path / "o", progress=False, cache=cache,
                                lockstep=lockstep, offload_dir=tmp_path / "scratch")
    assert (report.engine["cache"], report.engine["lockstep"]) == (cache, lockstep)
    assert_same_checkpoint(ref, out)
    assert r0.engine["lockstep"] == "lockstep"
    assert not (tmp_path / "scratch").exists() or not any((tmp_path / "scratch").iterdir())


STATIC_W8A8 = {"steps": [{"method": "gptq", "args": {
    "bits": 8, "group_size": -1, "act_bits": 8, "act_strategy": "tensor", "act_dynamic": False}}],
    "walker": W}


@pytest.mark.parametrize("name", ["gptq", "static-w8a8"])
def test_replay_equals_lockstep_in_memory(name):
    """The resident API too: replay passes per group give the lockstep walk's weights (and,
    with quantized activations, the same calibrated scales: each group's inputs quantized
    from the call it is compressed in)."""
    from conftest import tiny_model

    recipe = RECIPES.get(name, STATIC_W8A8)
    x = calib_ids(7, 24)
    a, _ = llmc.compress(tiny_model("llama"), recipe, calibration=x, progress=False,
                         lockstep="lockstep")
    b, rep = llmc.compress(tiny_model("llama"), recipe, calibration=x, progress=False,
                           lockstep="replay")
    assert rep.engine["lockstep"] == "replay"
    for (n, ma), mb in zip(a.named_modules(), b.modules()):
        if hasattr(ma, "weight") and isinstance(ma.weight, torch.Tensor):
            assert torch.equal(ma.weight, mb.weight), n
        if getattr(ma, "llmc_act_scale", None) is not None:
            assert torch.equal(ma.llmc_act_scale, mb.llmc_act_scale), n


def test_gguf_streams_like_transformers_loads_it(tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_gguf(tmp_path / "tiny.gguf", blocks=3)
    x = calib_ids(7, 24)
    out, _ = llmc.compress(str(path), RECIPES["gptq"], calibration=x, out=tmp_path / "s",
                           progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    # the lazy source gives exactly the tensors transformers' GGUF loader gives
    from llmc.models import load_config, resolve
    from llmc.models.lazy import open_lazy

    lazy = open_lazy(resolve(str(path)), load_config(str(path)))
    for name, p in model.named_parameters():
        got = lazy.source.read(lazy.checkpoint_name(name)).float()
        assert torch.equal(got, p.data), name
    model, _ = llmc.compress(model, RECIPES["gptq"], calibration=x, progress=False)
    llmc.save(model, tmp_path / "m")
    assert_same_checkpoint(out, tmp_path / "m")


def test_tied_embeddings_stream(tmp_path):
    src = write_sharded(tmp_path / "tied", blocks=2, tied=True)
    x = calib_ids(6, 16)
    out, _ = llmc.compress(str(src), RECIPES["gptq"], calibration=x, out=tmp_path / "s",
                           progress=False)
    in_memory(src, RECIPES["gptq"], tmp_path / "m", x)
    assert_same_checkpoint(out, tmp_path / "m")
    assert "lm_head.weight" not in output_tensors(out)
    back, _ = llmc.load(out)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_large_output_is_sharded_with_an_index(sharded, tmp_path):
    out, _ = llmc.compress(str(sharded), RECIPES["rtn"], out=tmp_path / "s", progress=False,
                           max_shard_bytes=10_000)
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names[0] == "model-00001-of-00004.safetensors" and len(names) == 4
    assert (out / "model.safetensors.index.json").is_file()
    model, _ = llmc.load(out)
    ref, _ = llmc.compress(load_model(str(sharded))[0], RECIPES["rtn"], progress=False)
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a.to(b.dtype), b), n
