"""The co-design cost model against the reference rows of the Step-3 report
(sections 4-5) and the architecture facts of the models' public configs."""
import json

import pytest

from afdserve.cost.analysis import (Precision, arithmetic_intensity, cost_report, kv_capacity,
                                    per_token_work, sparsity_report)
from afdserve.cost.arch import MODEL_PRESETS, ModelArch, from_hf_config, get_model
from afdserve.cost.hardware import (HARDWARE_PRESETS, REPORT_HARDWARE, get_hardware,
                                    parse_prices, resolve_hardware, with_price)

REL = 0.03          # the report prints 2-3 significant digits
CHIPS = ["H800", "H20", "A800", "910B"]


def close(value, ref, rel=REL, abs_=0.0006):
    """Within 3% or within half a unit of the paper's last printed digit."""
    return value == pytest.approx(ref, rel=rel, abs=abs_)


# --- report section 4.1: per-token work at 8K ---
WORK_8K = {
    "deepseek-v3": (2.88e8, 1.47e11, 2.28e10, 4.84e10),
    "qwen3-235b-a22b": (7.89e8, 2.52e10, 1.34e10, 2.84e10),
    "step3": (2.56e8, 3.27e10, 2.07e10, 5.33e10),
}


@pytest.mark.parametrize("model", WORK_8K)
def test_per_token_work_8k(model):
    w = per_token_work(MODEL_PRESETS[model], 8192)
    for got, ref in zip((w.kv_bytes, w.attention_flops, w.linear_flops, w.ffn_flops),
                        WORK_8K[model]):
        assert got == pytest.approx(ref, rel=0.01)


@pytest.mark.parametrize("model", WORK_8K)
def test_per_token_work_32k_scales(model):
    arch = MODEL_PRESETS[model]
    w8, w32 = per_token_work(arch, 8192), per_token_work(arch, 32768)
    assert w32.kv_bytes == pytest.approx(4 * w8.kv_bytes)
    assert w32.attention_flops == pytest.approx(4 * w8.attention_flops)
    assert (w32.linear_flops, w32.ffn_flops) == (w8.linear_flops, w8.ffn_flops)


# --- report section 4.2: cost per 1M tokens on H800 / H20 / A800 / 910B ---
COSTS = {  # attn 8K, attn 32K, FFN
    "deepseek-v3": ((0.054, 0.128, 0.114, 0.113), (0.197, 0.460, 0.409, 0.407),
                    (0.014, 0.036, 0.032, 0.032)),
    "qwen3-235b-a22b": ((0.135, 0.054, 0.091, 0.101), (0.527, 0.185, 0.338, 0.376),
                        (0.008, 0.021, 0.019, 0.019)),
    "step3": ((0.048, 0.040, 0.040, 0.043), (0.176, 0.114, 0.120, 0.133),
              (0.015, 0.040, 0.036, 0.035)),
}


@pytest.fixture(scope="module")
def report_hw():
    return resolve_hardware()


@pytest.mark.parametrize("model", COSTS)
def test_cost_rows(model, report_hw):
    attn8, attn32, ffn = COSTS[model]
    r8 = cost_report(MODEL_PRESETS[model], 8192, report_hw)
    r32 = cost_report(MODEL_PRESETS[model], 32768, report_hw)
    for i, chip in enumerate(CHIPS):
        assert close(r8["hardware"][chip]["attention_usd_per_mtok"], attn8[i]), chip
        assert close(r32["hardware"][chip]["attention_usd_per_mtok"], attn32[i]), chip
        assert close(r8["hardware"][chip]["ffn_usd_per_mtok"], ffn[i]), chip
        assert close(r32["hardware"][chip]["ffn_usd_per_mtok"], ffn[i]), chip


@pytest.mark.parametrize("model,ctx,ref", [
    ("step3", 8192, 0.055), ("deepseek-v3", 8192, 0.068), ("qwen3-235b-a22b", 8192, 0.062),
    ("step3", 32768, 0.129), ("deepseek-v3", 32768, 0.211), ("qwen3-235b-a22b", 32768, 0.193),
])
def test_headline(model, ctx, ref, report_hw):
    r = cost_report(MODEL_PRESETS[model], ctx, report_hw)
    assert close(r["best_afd"]["usd_per_mtok"], ref)


def test_headline_pairings(report_hw):
    step3 = cost_report(MODEL_PRESETS["step3"], 8192, report_hw)
    assert step3["best_afd"]["attention_hardware"] in ("H20", "A800")
    assert step3["best_afd"]["ffn_hardware"] == "H800"
    ds = cost_report(MODEL_PRESETS["deepseek-v3"], 8192, report_hw)
    assert ds["best_afd"]["attention_hardware"] == ds["best_afd"]["ffn_hardware"] == "H800"
    assert ds["best_single"] == {"hardware": "H800",
                                 "usd_per_mtok": pytest.approx(0.068, rel=REL)}


def test_report_json_shape(report_hw):
    r = json.loads(json.dumps(cost_report(MODEL_PRESETS["step3"], 8192, report_hw)))
    assert set(r["per_token"]) >= {"kv_bytes", "attention_flops", "linear_flops", "ffn_flops"}
    assert set(r["hardware"]) == set(CHIPS)
    for chip in r["hardware"].values():
        assert set(chip) >= {"attention_usd_per_mtok", "ffn_usd_per_mtok", "total_usd_per_mtok"}
    assert set(r["best_afd"]) >= {"attention_hardware", "ffn_hardware", "usd_per_mtok"}
    assert set(r["best_single"]) >= {"hardware", "usd_per_mtok"}
    assert r["model"] == "step3" and r["context"] == 8192


# --- arithmetic intensity ---
@pytest.mark.parametrize("model,ref", [("step3", 128), ("deepseek-v3", 512),
                                       ("qwen3-235b-a22b", 32), ("kimi-k2", 256),
                                       ("qwen3-32b", 16), ("ernie-4.5-300b-a47b", 16),
                                       ("pangu-pro-moe", 10)])
def test_arithmetic_intensity(model, ref):
    for ctx in (4096, 8192, 65536):
        assert arithmetic_intensity(MODEL_PRESETS[model], ctx) == pytest.approx(ref)


def test_ridges():
    for name, ref in {"H800": 591, "H20": 74, "A800": 156, "910B": 175}.items():
        assert HARDWARE_PRESETS[name].ridge == pytest.approx(ref, rel=0.005)


# --- section 5: sparsity ---
def test_sparsity_step3_h800(report_hw):
    r = sparsity_report(MODEL_PRESETS["step3"], report_hw)
    assert r["sparsity"] == pytest.approx(4 / 48)
    h800 = r["hardware"]["H800"]
    assert h800["min_sparsity"] == pytest.approx(0.058, rel=0.02)
    assert h800["min_sparsity_measured_nic"] == pytest.approx(0.073, rel=0.02)
    assert h800["min_batch_dense"] == pytest.approx(591 / 2, rel=0.01)
    assert h800["min_batch_moe"] == pytest.approx(1.98e15 / (2 * (4 / 48) * 3.35e12))
    assert not h800["network_bound"]


def test_sparsity_deepseek_needs_more_experts(report_hw):
    r = sparsity_report(MODEL_PRESETS["deepseek-v3"], report_hw)
    assert r["sparsity"] == pytest.approx(9 / 256)
    h800 = r["hardware"]["H800"]
    assert h800["network_bound"] and h800["ffn_cost_factor"] > 1.5
    assert 14 <= h800["min_active_experts"] <= 15.5   # "about 14 active experts"


def test_dense_model_sparsity_is_one(report_hw):
    r = sparsity_report(MODEL_PRESETS["qwen3-32b"], report_hw)
    assert r["sparsity"] == 1.0 and r["hardware"]["H800"]["min_active_experts"] is None


# --- the other presets: derivations from their public configs ---
def test_step3_parameter_counts():
    a = MODEL_PRESETS["step3"]
    assert a.attention_params_per_layer() == pytest.approx(169.3e6, rel=1e-3)
    assert a.total_params() == pytest.approx(316.3e9, rel=2e-3)
    assert a.active_params() == pytest.approx(37.9e9, rel=5e-3)
    assert a.num_dense_layers == 5 and a.num_moe_layers == 56


def test_kimi_k2():
    a = MODEL_PRESETS["kimi-k2"]
    w = per_token_work(a, 8192)
    assert w.kv_bytes == 61 * 8192 * 576
    assert w.attention_flops == 61 * 8192 * 4 * 64 * 576
    per_layer = (7168 * 1536 + 1536 * 64 * 192 + 7168 * 576 + 512 * 64 * 256 + 64 * 128 * 7168)
    assert w.linear_flops == 2 * 61 * per_layer
    assert w.ffn_flops == 2 * 3 * 7168 * (18432 + 60 * 9 * 2048)
    assert a.sparsity == pytest.approx(9 / 384)


def test_qwen3_32b():
    w = per_token_work(MODEL_PRESETS["qwen3-32b"], 8192)
    assert w.kv_bytes == 64 * 8192 * 2 * 8 * 128
    assert w.linear_flops == 2 * 64 * (2 * 5120 * 8192 + 2 * 5120 * 1024)
    assert w.ffn_flops == 2 * 64 * 3 * 5120 * 25600


def test_ernie():
    a = MODEL_PRESETS["ernie-4.5-300b-a47b"]
    assert a.num_dense_layers == 3 and a.num_moe_layers == 51
    w = per_token_work(a, 8192)
    assert w.ffn_flops == 2 * 3 * 8192 * (3 * 28672 + 51 * 8 * 3584)
    assert w.kv_bytes == 54 * 8192 * 2 * 8 * 128


def test_pangu_shared_experts():
    a = MODEL_PRESETS["pangu-pro-moe"]
    w = per_token_work(a, 8192)
    assert w.ffn_flops == 2 * 48 * (8 + 4) * 3 * 5120 * 1344
    assert a.sparsity == pytest.approx(12 / 64)


def test_llama4_maverick_chunked_and_bf16_global():
    a = MODEL_PRESETS["llama4-maverick"]
    assert (a.num_full_layers, a.num_chunked_layers) == (12, 36)
    for ctx in (4096, 8192, 32768):
        w = per_token_work(a, ctx)
        assert w.kv_bytes == 36 * min(ctx, 8192) * 2048 * 1 + 12 * ctx * 2048 * 2
        assert w.attention_flops == 4 * 40 * 128 * (36 * min(ctx, 8192) + 12 * ctx)
    w = per_token_work(a, 8192)
    assert a.num_dense_layers == 24 and a.num_moe_layers == 24
    assert w.ffn_flops == 2 * 3 * 5120 * (24 * 16384 + 24 * 2 * 8192)
    assert w.linear_flops == 2 * 48 * (2 * 5120 * 5120 + 2 * 5120 * 1024)
    assert arithmetic_intensity(a, 8192) == pytest.approx(8.0)


def test_minimax_lightning_state():
    a = MODEL_PRESETS["minimax-m1"]
    state = 64 * 128 * 128 * 4                       # fp32 bytes per layer
    w8, w32 = per_token_work(a, 8192), per_token_work(a, 32768)
    assert w8.kv_bytes == 70 * 2 * state + 10 * 8192 * 2048 * 2
    assert w32.kv_bytes - w8.kv_bytes == 10 * (32768 - 8192) * 2048 * 2
    lightning_flops = 70 * 4 * 64 * 128 * 128
    assert w8.attention_flops == lightning_flops + 10 * 8192 * 4 * 64 * 128
    assert per_token_work(a, 1).attention_flops - 10 * 4 * 64 * 128 == lightning_flops
    assert w8.linear_flops == 2 * (70 * 5 * 6144 * 8192
                                   + 10 * (2 * 6144 * 8192 + 2 * 6144 * 1024))
    assert w8.ffn_flops == 2 * 80 * 2 * 3 * 6144 * 9216


def test_all_presets_report(report_hw):
    for name, arch in MODEL_PRESETS.items():
        assert get_model(name) is arch
        r = cost_report(arch, 8192, report_hw)
        assert r["best_afd"]["usd_per_mtok"] <= r["best_single"]["usd_per_mtok"] + 1e-12
        assert 0 < arch.active_params() < arch.total_params()


def test_preset_names_exact():
    assert set(MODEL_PRESETS) == {"step3", "deepseek-v3", "kimi-k2", "qwen3-235b-a22b",
                                  "qwen3-32b", "ernie-4.5-300b-a47b", "pangu-pro-moe",
                                  "llama4-maverick", "minimax-m1"}
    assert set(HARDWARE_PRESETS) == {"H800", "H20", "A800", "910B", "H100", "H200", "B200",
                                     "L20", "L40S", "MI300X"}
    for hw in HARDWARE_PRESETS.values():
        assert hw.source
        if hw.name not in REPORT_HARDWARE:
            assert "assumption" in hw.source


# --- precision knobs ---
def test_bf16_kv_doubles_bytes():
    a = MODEL_PRESETS["step3"]
    assert per_token_work(a, 8192, Precision(kv_bytes=2)).kv_bytes == 2 * 61 * 8192 * 512
    assert arithmetic_intensity(a, 8192, Precision(kv_bytes=2)) == pytest.approx(64)


def test_bf16_compute_costs_more(report_hw):
    a = MODEL_PRESETS["step3"]
    fp8 = cost_report(a, 8192, report_hw)["hardware"]["H800"]["ffn_usd_per_mtok"]
    bf16 = cost_report(a, 8192, report_hw, Precision(compute="bf16"))
    assert bf16["hardware"]["H800"]["ffn_usd_per_mtok"] == pytest.approx(2 * fp8, rel=0.01)
    # A800 has no FP8: the same either way
    assert bf16["hardware"]["A800"]["ffn_usd_per_mtok"] == pytest.approx(
        cost_report(a, 8192, report_hw)["hardware"]["A800"]["ffn_usd_per_mtok"])


# --- hardware and prices ---
def test_prices():
    assert parse_prices("H20=1.0, h800=2.5") == {"H20": 1.0, "H800": 2.5}
    assert parse_prices(["H20=1", "A800=0.5"]) == {"H20": 1.0, "A800": 0.5}
    for bad in ("H20", "H20=abc", "H20=-1", "XYZ=1", "=1"):
        with pytest.raises(ValueError):
            parse_prices(bad)
    hw = with_price(get_hardware("h20"), 1.6)
    assert hw.usd_per_hour == 1.6 and "overridden" in hw.source
    r = cost_report(MODEL_PRESETS["step3"], 8192, resolve_hardware("H20", {"H20": 1.6}))
    assert r["hardware"]["H20"]["attention_usd_per_mtok"] == pytest.approx(0.080, rel=0.02)
    assert get_hardware("Ascend 910B").name == "910B"
    with pytest.raises(ValueError, match="unknown hardware"):
        get_hardware("TPUv9")


def test_kv_capacity():
    a, hw = MODEL_PRESETS["step3"], HARDWARE_PRESETS["H800"]
    cap = kv_capacity(a, hw, 8192)
    weights = a.attention_side_params()
    assert cap["fits"] and cap["weight_bytes_per_gpu"] == weights
    assert cap["tokens_per_gpu"] == int((80e9 * 0.9 - weights) / (61 * 512))
    assert cap["tokens_per_instance"] == 8 * cap["tokens_per_gpu"]
    assert "data-parallel" in cap["assumption"]
    # MiniMax: sequences also hold the lightning state
    m = kv_capacity(MODEL_PRESETS["minimax-m1"], hw, 8192)
    assert m["sequences_per_gpu_at_context"] < m["tokens_per_gpu"] / 8192


# --- from config.json ---
STEP3_TEXT = {
    "model_type": "step3_text", "hidden_size": 7168, "num_hidden_layers": 61,
    "num_attention_heads": 64, "num_attention_groups": 1, "head_dim": 256,
    "share_q_dim": 2048, "intermediate_size": 18432, "moe_layers_enum": ",".join(
        str(i) for i in range(4, 60)), "moe_num_experts": 48, "moe_top_k": 3,
    "moe_intermediate_size": 5120, "share_expert_dim": 5120, "norm_expert_weight": False,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embedding": 65536,
    "vocab_size": 128815, "torch_dtype": "bfloat16",
}

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    "vocab_size": 129280, "tie_word_embeddings": False,
}

QWEN3_MOE = {
    "model_type": "qwen3_moe", "hidden_size": 4096, "num_hidden_layers": 94,
    "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
    "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_experts": 128,
    "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "vocab_size": 151936, "tie_word_embeddings": False,
}

QWEN3_32B = {
    "model_type": "qwen3", "hidden_size": 5120, "num_hidden_layers": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
    "intermediate_size": 25600, "vocab_size": 151936, "tie_word_embeddings": False,
}


def _same_numbers(a: ModelArch, b: ModelArch, report_hw):
    for ctx in (4096, 32768):
        ra, rb = cost_report(a, ctx, report_hw), cost_report(b, ctx, report_hw)
        assert ra["per_token"] == rb["per_token"]
        assert ra["hardware"] == rb["hardware"]
        assert ra["best_afd"] == rb["best_afd"]
    assert a.total_params() == b.total_params()
    assert a.active_params() == b.active_params()
    assert a.sparsity == b.sparsity


@pytest.mark.parametrize("cfg,preset", [(STEP3_TEXT, "step3"), (DEEPSEEK_V3, "deepseek-v3"),
                                        (QWEN3_MOE, "qwen3-235b-a22b"),
                                        (QWEN3_32B, "qwen3-32b")])
def test_config_matches_preset(tmp_path, cfg, preset, report_hw):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    _same_numbers(get_model(str(path)), MODEL_PRESETS[preset], report_hw)
    _same_numbers(from_hf_config(tmp_path), MODEL_PRESETS[preset], report_hw)


def test_step3_vl_config(tmp_path, report_hw):
    text = dict(STEP3_TEXT, moe_layers_enum=list(range(4, 60)))
    vl = {"model_type": "step3_vl", "architectures": ["Step3VLForConditionalGeneration"],
          "text_config": text, "vision_config": {"hidden_size": 1792, "num_hidden_layers": 63}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(vl))
    _same_numbers(from_hf_config(str(path)), MODEL_PRESETS["step3"], report_hw)


def test_qwen3_moe_sparse_step_and_mlp_only():
    cfg = dict(QWEN3_MOE, decoder_sparse_step=2, mlp_only_layers=[1])
    a = from_hf_config(cfg)
    assert a.moe_layer_ids == tuple(i for i in range(3, 94, 2))
    assert a.num_dense_layers == 94 - 46 and a.dense_width == 12288


def test_head_dim_from_hidden():
    cfg = {k: v for k, v in QWEN3_32B.items() if k != "head_dim"}
    cfg.update(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32)
    a = from_hf_config(cfg)
    assert a.head_dim == 128 and a.attention == "mha"


@pytest.mark.parametrize("cfg,field", [
    ({k: v for k, v in DEEPSEEK_V3.items() if k != "kv_lora_rank"} | {"kv_lora_rank": None},
     "kv_lora_rank"),
    ({k: v for k, v in STEP3_TEXT.items() if k != "share_q_dim"} | {"model_type": "step3_text"},
     "share_q_dim"),
    (QWEN3_32B | {"hidden_size": "big"}, "hidden_size"),
    ({k: v for k, v in QWEN3_32B.items() if k != "num_hidden_layers"}, "num_hidden_layers"),
    (QWEN3_MOE | {"moe_intermediate_size": -1}, "moe_intermediate_size"),
    ({"model_type": "mamba", "d_model": 768}, "num_attention_heads"),
    ({"model_type": "step3_vl", "text_config": 3}, "text_config"),
])
def test_bad_config_names_field(cfg, field):
    with pytest.raises(ValueError, match=field):
        from_hf_config(cfg)


def test_unreadable_config(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_model(str(bad))
    with pytest.raises(ValueError, match="not found"):
        get_model(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown model"):
        get_model("gpt-9")
