"""Recipe validation: misspelt keys and stages are errors that name the valid ones."""

import pytest

from llmopt.errors import LLMOptError
from llmopt.recipe import parse_recipe, recipe_to_yaml
from llmopt.stages import REGISTRY


def test_shipped_configs_parse(tmp_path):
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for p in configs:
        r = parse_recipe(p)
        assert r.stages, p
        # the resolved recipe round-trips through YAML unchanged
        assert parse_recipe(recipe_to_yaml(r)) == r


def test_unknown_key_names_valid_keys():
    with pytest.raises(LLMOptError) as e:
        parse_recipe({"stages": [{"stage": "magnitude", "sparsty": 0.5}]})
    msg = str(e.value)
    assert "'sparsty'" in msg and "sparsity" in msg and "pattern" in msg and "\n" not in msg


def test_unknown_top_level_key():
    with pytest.raises(LLMOptError, match="unknown key 'stagse' in recipe; valid keys: .*stages"):
        parse_recipe({"stagse": []})


def test_unknown_calibration_key():
    with pytest.raises(LLMOptError, match="unknown key 'sample' in calibration; valid keys: data, samples"):
        parse_recipe({"calibration": {"sample": 3}, "stages": [{"stage": "magnitude", "sparsity": 0.5}]})


def test_unknown_stage_lists_registry():
    with pytest.raises(LLMOptError) as e:
        parse_recipe({"stages": [{"stage": "sparsegtp", "sparsity": 0.5}]})
    msg = str(e.value)
    assert "unknown stage 'sparsegtp'" in msg
    for name in REGISTRY:
        assert name in msg


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.1])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(LLMOptError, match=r"sparsity must be in \[0, 1\)"):
        parse_recipe({"stages": [{"stage": "magnitude", "sparsity": sparsity}]})


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(LLMOptError, match="bits must be in 2..8"):
        parse_recipe({"stages": [{"stage": "rtn", "format": "int", "bits": bits}]})


def test_pattern_sets_sparsity_and_rejects_contradiction():
    r = parse_recipe({"stages": [{"stage": "magnitude", "pattern": "2:4"}]})
    assert r.stages[0].sparsity == 0.5
    with pytest.raises(LLMOptError, match="contradicts"):
        parse_recipe({"stages": [{"stage": "magnitude", "pattern": "2:4", "sparsity": 0.3}]})
    with pytest.raises(LLMOptError, match="N:M needs 1 <= N < M"):
        parse_recipe({"stages": [{"stage": "magnitude", "pattern": "4:4"}]})


def test_missing_recipe_file():
    with pytest.raises(LLMOptError, match="recipe not found"):
        parse_recipe("configs/does-not-exist.yaml")


def test_act_order_needs_static_groups_on_block_formats():
    with pytest.raises(LLMOptError, match="act_order with grouped formats needs static_groups"):
        parse_recipe({"stages": [{"stage": "gptq", "format": "q4_0", "act_order": True, "static_groups": False}]})
    ok = parse_recipe({"stages": [{"stage": "gptq", "format": "q4_0", "act_order": True, "static_groups": True}]})
    assert ok.stages[0].static_groups


def test_gptq_stage_defaults_are_the_measured_best():
    """A bare gptq entry runs what the shipped configs run (eval/results/gptq-defaults.md)."""
    st = parse_recipe({"stages": [{"stage": "gptq", "format": "int", "bits": 4, "group_size": 64}]}).stages[0]
    assert (st.act_order, st.static_groups, st.mse_grid) == (True, True, 20)
    rtn = parse_recipe({"stages": [{"stage": "rtn", "format": "q4_0"}]}).stages[0]
    assert rtn.mse_grid == 0  # RTN stays llama.cpp's reference quantizer (byte-identical exports)
    plain = {"stage": "gptq", "format": "q4_0", "act_order": False, "static_groups": False, "mse_grid": 0}
    assert parse_recipe({"stages": [plain]}).stages[0].mse_grid == 0  # the paper's plain GPTQ, when asked


def test_unknown_format_and_block_group_size():
    with pytest.raises(LLMOptError, match="unknown format 'q3_0'"):
        parse_recipe({"stages": [{"stage": "rtn", "format": "q3_0"}]})
    with pytest.raises(LLMOptError):
        parse_recipe({"stages": [{"stage": "rtn", "format": "q4_0", "group_size": 64}]})
