"""Recipes: parsing, eager validation with errors that name the key, shape checks from the
config alone."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from llmc import Recipe
from llmc.checks import check_model, check_seqlen
from llmc.methods.gptq import GPTQConfig
from llmc.registry import METHODS

YAML = """
steps:
  - method: gptq
    targets: ["re:.*(q|k|v|o|gate|up|down)_proj$"]
    ignore: [lm_head]
    args: {bits: 4, group_size: 32, sym: true, act_order: static, damp: 0.01}
calibration: {dataset: wikitext2, samples: 16, seqlen: 128, seed: 0}
walker: {batch_size: 8, dtype: float32}
"""


def test_yaml_round_trip(tmp_path):
    r = Recipe.from_yaml(YAML)
    assert r.steps[0].config == GPTQConfig(bits=4, group_size=32)
    assert r.calibration.samples == 16 and r.walker.batch_size == 8
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    assert Recipe.from_yaml(p) == r
    assert Recipe.from_yaml(str(p)).to_dict() == r.to_dict()


@pytest.mark.parametrize(
    "data, match",
    [
        ({"steps": [{"method": "gptq"}], "calibraton": {}}, "unknown recipe key.*calibraton"),
        ({"steps": [{"method": "gptx"}]}, "unknown method 'gptx'.*gptq, magnitude, rtn"),
        ({"steps": [{"method": "gptq", "args": {"bitz": 4}}]}, "steps\\[0\\].*bitz.*valid"),
        ({"steps": [{"method": "gptq", "args": {"bits": 9}}]}, "steps\\[0\\].*bits"),
        ({"steps": [{"method": "gptq", "target": ["x"]}]}, "steps\\[0\\].*target"),
        ({"steps": [{"method": "rtn"}], "calibration": {"samples": 0}}, "calibration.*samples"),
        ({"steps": [{"method": "rtn"}], "walker": {"dtype": "int8"}}, "walker.*dtype"),
        ({"steps": []}, "steps"),
        ({"steps": [{"method": "gptq", "targets": ["re:("]}]}, "regular expression"),
    ],
)
def test_errors_before_anything_loads(data, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict(data)


def test_yaml_is_safe_loaded():
    with pytest.raises(ValueError, match="YAML"):
        Recipe.from_yaml("steps: !!python/object/apply:os.system ['echo hi']\n")


def test_shape_errors_from_config_alone():
    r = Recipe.from_dict({"steps": [{"method": "gptq", "args": {"group_size": 256}}]})
    with pytest.raises(ValueError, match="group_size: 256 is larger than the input width 64"):
        check_model(r, tiny_config("llama"))
    r = Recipe.from_dict({"steps": [{"method": "gptq", "targets": ["nothing_here"]}]})
    with pytest.raises(ValueError, match="matches no Linear"):
        check_model(r, tiny_config("llama"))
    check_model(Recipe.from_dict({"steps": [{"method": "gptq", "args": {"group_size": 48}}]}),
                tiny_config("llama"))  # 64 = 48 + 16: a narrow last group is legal


def test_registry_lists_arguments():
    args = {a for a, _, _ in METHODS.get("GPTQ").arguments()}
    assert {"bits", "group_size", "sym", "act_order", "damp", "clip"} <= args
    with pytest.raises(ValueError, match="already registered"):
        METHODS.register("gptq", GPTQConfig, object)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"steps": [{"method": "gptq", "args": {"sym": "false"}}]}, "sym must be bool"),
        ({"steps": [{"method": "gptq", "args": {"block_size": 64.0}}]}, "block_size must be int"),
        ({"steps": [{"method": "rtn"}], "walker": {"batch_size": 2.5}}, "batch_size must be int"),
        ({"steps": [{"method": "gptq", "args": {"bits": True}}]}, "bits must be int"),
    ],
)
def test_argument_types_are_checked(data, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict(data)


def test_gptq_writability_is_checked_before_work():
    from llmc.formats.checkpoint import check_writable

    with pytest.raises(ValueError, match="5-bit weights cannot be written"):
        check_writable(Recipe.from_dict({"steps": [{"method": "gptq", "args": {"bits": 5}}]}),
                       "gptq")
    mixed = {"steps": [{"method": "gptq", "targets": ["re:attn"]},
                       {"method": "rtn", "targets": ["re:mlp"], "args": {"bits": 8}}]}
    with pytest.raises(ValueError, match="several schemes"):
        check_writable(Recipe.from_dict(mixed), "gptq")


def test_calibration_longer_than_positions():
    r = Recipe.from_dict({"steps": [{"method": "gptq", "args": {"group_size": 32}}],
                          "calibration": {"seqlen": 4096}})
    with pytest.raises(ValueError, match="calibration.seqlen: 4096 is longer"):
        check_seqlen(r, tiny_config("llama"))
