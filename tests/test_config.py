import json

import pytest

from afdserve.config import ConfigError, Step3Config, get_preset

TEXT = get_preset("tiny").to_dict()


def test_step3_parameter_counts_match_report():
    n = get_preset("step3").num_parameters()
    assert round(n["total"] / 1e9, 1) == 316.3
    assert round(n["active"] / 1e9, 1) == 37.9


def test_parameter_count_is_the_cost_models_plus_norms_and_matches_the_model():
    """One parameter count: Step3Config's is ModelArch's (which leaves norms out) plus the norms,
    and equals the built model's parameters."""
    from afdserve.cost.arch import from_hf_config
    from afdserve.model.step3 import Step3ForCausalLM

    c = get_preset("tiny")
    arch = from_hf_config(c.to_dict())
    norms = c.num_hidden_layers * (c.share_q_dim + 2 * c.hidden_size) + c.hidden_size
    n = c.num_parameters()
    assert n == {"total": arch.total_params() + norms, "active": arch.active_params() + norms}
    assert n["total"] == sum(p.numel() for p in Step3ForCausalLM(c).parameters())


def test_small_preset_in_range():
    n = get_preset("small").num_parameters()["total"]
    assert 100e6 <= n <= 300e6
    assert 1e5 <= get_preset("tiny").num_parameters()["total"] < 1e6


def test_text_and_vl_forms_agree_and_unknown_keys_ignored():
    text = Step3Config.from_dict({**TEXT, "some_future_key": 3})
    vl = Step3Config.from_dict({"model_type": "step3_vl", "vision_config": {"hidden_size": 9},
                                "text_config": {**TEXT, "model_type": "step3_text"}})
    assert text == vl == get_preset("tiny")


def test_layers_enum_as_string_or_list_and_seq_len_alias():
    d = {**TEXT, "moe_layers_enum": [1, 2]}
    d.pop("max_position_embedding")
    d["max_seq_len"] = 333
    c = Step3Config.from_dict(d)
    assert c.moe_layers_enum == (1, 2) and c.max_position_embedding == 333


@pytest.mark.parametrize("change, field", [
    ({"hidden_size": None}, "hidden_size"),
    ({"num_attention_heads": 6, "num_attention_groups": 4}, "num_attention_heads"),
    ({"moe_top_k": 9}, "moe_top_k"),
    ({"moe_layers_enum": "1,7"}, "moe_layers_enum"),
    ({"moe_layers_enum": "1,x"}, "moe_layers_enum"),
    ({"head_dim": 15}, "head_dim"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"moe_num_experts": 0}, "moe_num_experts"),
])
def test_bad_config_names_the_field(change, field):
    d = {**TEXT, **change}
    if change.get("hidden_size", 1) is None:
        d.pop("hidden_size")
    with pytest.raises(ConfigError, match=field):
        Step3Config.from_dict(d)


def test_vl_without_text_config_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="text_config"):
        Step3Config.from_dict({"model_type": "step3_vl"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Step3Config.from_file(tmp_path)


def test_round_trip_through_json(tmp_path):
    c = get_preset("small")
    (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
    assert Step3Config.from_file(tmp_path) == c
