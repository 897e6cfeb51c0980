"""Precision per stage in the simulator, the report's way: the attention core (QK^T, PV) runs BF16
in every configuration; "FP8 attention" = FP8 projection GEMMs + 8-bit KV (no torch)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from afdserve.cost.arch import get_model
from afdserve.cost.hardware import Hardware, get_hardware
from afdserve.sim.simulator import (Deployment, SimPrecision, attention_time, calibrate, load_efficiency,
                                    max_batch_for_tpot, simulate, stage_times)

STEP3, DSV3 = get_model("step3"), get_model("deepseek-v3")
H800 = get_hardware("H800")
# FP8 peak 4x BF16 and little bandwidth: the attention core is compute bound, so its peak shows
SLOW_BF16 = Hardware(name="t", usd_per_hour=1.0, bf16_flops=1e14, fp8_flops=4e14, hbm_bytes_per_s=1e15,
                     memory_bytes=80e9, nic_bytes_per_s=5e10)


def test_the_attention_core_runs_bf16_in_both_configurations():
    eff = load_efficiency()
    for name in ("fp8", "bf16"):
        p = SimPrecision.for_attention(name)
        assert p.attention_compute == "bf16" and p.attention_label == name
        t = attention_time(STEP3, SLOW_BF16, 64, 8192, p, eff)
        flops = 64 * STEP3.attention_flops_per_token(8192) / STEP3.num_layers
        assert t["core"] == pytest.approx(flops / (SLOW_BF16.bf16_flops * eff.attention_flop_efficiency), rel=1e-9)


def test_fp8_attention_is_fp8_projections_and_8bit_kv():
    eff = load_efficiency()
    f8, b16 = SimPrecision.for_attention("fp8"), SimPrecision.for_attention("bf16")
    assert (f8.kv_bytes, f8.projection_bytes, f8.projection_compute) == (1.0, 1.0, "fp8")
    assert (b16.kv_bytes, b16.projection_bytes, b16.projection_compute) == (2.0, 2.0, "bf16")
    # projections at 1 row are weight streaming: BF16 reads twice the bytes
    a8 = attention_time(STEP3, H800, 1, 4096, f8, eff)["linear"]
    a16 = attention_time(STEP3, H800, 1, 4096, b16, eff)["linear"]
    assert a16 == pytest.approx(2 * a8, rel=1e-9)
    # compute-bound projections: FP8 runs at the FP8 peak, BF16 at the BF16 peak
    big = 100_000
    c8 = attention_time(STEP3, SLOW_BF16, big, 16, f8, eff)["linear"]
    c16 = attention_time(STEP3, SLOW_BF16, big, 16, b16, eff)["linear"]
    assert c16 == pytest.approx(4 * c8, rel=1e-6)


def test_attention_precision_leaves_the_ffn_and_transfers_alone():
    dep = Deployment("afd", H800, H800, 2, 2, 8, micro_batches=3)
    eff = load_efficiency()
    s8 = stage_times(STEP3, dep, 4096, 6144, SimPrecision.for_attention("fp8"), eff)
    s16 = stage_times(STEP3, dep, 4096, 6144, SimPrecision.for_attention("bf16"), eff)
    assert (s8.ffn, s8.dense_ffn, s8.a2f, s8.f2a) == (s16.ffn, s16.dense_ffn, s16.a2f, s16.f2a)
    assert s16.attention > 1.5 * s8.attention
    m8 = simulate(STEP3, dep, 4096, 3072, SimPrecision.for_attention("fp8")).memory["attention"]
    m16 = simulate(STEP3, dep, 4096, 3072, SimPrecision.for_attention("bf16")).memory["attention"]
    assert m16["kv_gb"] == pytest.approx(2 * m8["kv_gb"])
    extra = STEP3.attention_params_total() / 1e9                 # one more byte per projection weight
    assert m16["weights_gb"] - m8["weights_gb"] == pytest.approx(extra)


def test_both_calibration_points_hold_under_the_per_stage_precision():
    eff = load_efficiency()
    afd = Deployment("afd", H800, H800, 2, 2, 8, micro_batches=3)
    assert simulate(STEP3, afd, 4096, 6144, None, eff).tokens_per_gpu_s == pytest.approx(4039, rel=0.01)
    col = Deployment("colocated", H800, H800, ep=128, micro_batches=2)
    r = max_batch_for_tpot(DSV3, col, 4096, 50.0, None, eff)
    assert r.tokens_per_gpu_s == pytest.approx(2324, rel=0.05)
    # DeepSeek-V3's MLA core at BF16 is compute bound on H800 (at FP8 peak it would not be)
    t = attention_time(DSV3, H800, 64, 4096, SimPrecision(), eff)
    t_fp8_core = attention_time(DSV3, H800, 64, 4096, SimPrecision(attention_compute="fp8"), eff)
    assert t["core"] > 1.3 * t_fp8_core["core"]
    # the stored factors are what calibrate() fits
    fitted = calibrate(eff)
    assert fitted.hbm_efficiency == pytest.approx(eff.hbm_efficiency, rel=0.01)
    assert fitted.colocated_a2a_efficiency == pytest.approx(eff.colocated_a2a_efficiency, rel=0.01)


def test_custom_precision_is_labelled_and_cpu_fp32_unchanged():
    p = SimPrecision(kv_bytes=1.0, attention_weight_bytes=2.0, attention_gemm_compute="bf16")
    assert p.attention_label == "bf16 projections, 8-bit KV"
    fp32 = SimPrecision(weight_bytes=4, kv_bytes=4, a2f_bytes=4, f2a_bytes=4, a2f_scales=False)
    assert fp32.projection_bytes == 4 and replace(fp32, attention_weight_bytes=2).projection_bytes == 2
