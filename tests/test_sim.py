"""AFD deployment simulator: the calibration points, then out-of-sample checks (published figures
the efficiency factors were not fitted on, and a decode run measured on this machine), physics,
CLI (torch only in the measured-run test)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from afdserve.cost.arch import get_model
from afdserve.cost.hardware import get_hardware
from afdserve.sim.cli import PAPER_KEYS
from afdserve.sim.planner import PlanQuery, plan
from afdserve.sim.simulator import Deployment, SimPrecision, attention_time, load_efficiency, \
    max_batch_for_tpot, parse_afd, simulate

H800 = get_hardware("H800")
STEP3, DSV3 = get_model("step3"), get_model("deepseek-v3")


def afd(x: int, y: int, m: int = 3, a=H800, f=H800) -> Deployment:
    return Deployment("afd", a, f, x, y, 8, micro_batches=m)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "afdserve", *args], capture_output=True,
                          text=True, timeout=120)


# ----- the two calibration points (report section 7) -----

def test_step3_2a2f_calibration_point():
    r = simulate(STEP3, afd(2, 2), 4096, 6144)
    assert r.gpus == 32 and r.fits
    assert r.tokens_per_gpu_s == pytest.approx(4039, rel=0.05)
    assert r.tpot_ms <= 50


def test_deepseek_v3_colocated_calibration_point():
    dep = Deployment("colocated", H800, H800, ep=128, micro_batches=2)
    r = max_batch_for_tpot(DSV3, dep, 4096, 50.0)
    assert r is not None and r.tpot_ms <= 50 and r.fits
    assert r.tokens_per_gpu_s == pytest.approx(2324, rel=0.05)


# ----- out of sample: figures the two fitted factors were NOT fitted on -----
# efficiency.json fits hbm_efficiency on the 4,039 point and colocated_a2a_efficiency on the 2,324
# point above, nothing else; every check below compares with a figure outside that fit.

ATTN_8K = {  # report section 7: 8K context, 4 GPUs, total batch 256, linear projections included
    ("step3", "H800"): 281, ("step3", "H20"): 438, ("step3", "A800"): 531,
    ("deepseek-v3", "H800"): 372, ("deepseek-v3", "H20"): 1252,
    ("qwen3-235b-a22b", "H800"): 382, ("qwen3-235b-a22b", "H20"): 812,
    ("qwen3-235b-a22b", "A800"): 791,
}
# Qwen3 on H20 measured 2.1x slower than on H800 although H20 has more HBM bandwidth and the
# GQA core is memory bound: a kernel effect a roofline cannot predict; reported, not asserted.
KNOWN_OUTLIERS = {("qwen3-235b-a22b", "H20")}
# The attention core runs BF16 (as in the report): on H20 (148 BF16 TFLOPS) MFA and MLA are compute
# bound and the H800-derived core efficiency (0.59) predicts 1.35x / 1.6x the report's latencies,
# which imply ~0.8 of H20's BF16 peak (docs/simulator.md, precision); reported, bounded.
BF16_CORE_H20 = {("step3", "H20"), ("deepseek-v3", "H20")}


@pytest.mark.parametrize("key", sorted(ATTN_8K))
def test_attention_layer_latency_sanity(key):
    model, chip = key
    t = attention_time(get_model(model), get_hardware(chip), 256 / 4, 8192, SimPrecision(),
                       load_efficiency())["total"] * 1e6
    ratio = t / ATTN_8K[key]
    print(f"{model} {chip}: predicted {t:.0f} us vs measured {ATTN_8K[key]} (x{ratio:.2f})")
    if key in KNOWN_OUTLIERS:
        assert 0.3 < ratio < 1.0
    elif key in BF16_CORE_H20:
        assert 1.0 < ratio < 1.8
    else:
        assert 0.65 < ratio < 1.35


def test_transfer_bytes_match_report():
    # Report: 2A2F moves ~0.9 MB A->F and ~1.8 MB F->A per FFN GPU per layer (micro-batch).
    r = simulate(STEP3, afd(2, 2), 4096, 6144)
    nic = H800.nic_bytes_per_s * load_efficiency().nic_efficiency
    lat = load_efficiency().transfer_latency_us
    assert (r.stage_us["a2f"] - lat) * 1e-6 * nic == pytest.approx(0.95e6, rel=0.1)
    assert (r.stage_us["f2a"] - lat) * 1e-6 * nic == pytest.approx(1.84e6, rel=0.05)


def test_deepseek_v3_service_statistic_at_5k():
    """DeepSeek's published service statistics: 14.8k output tokens/s per 8-GPU H800 node (1,850 per
    GPU) at ~5K average context. The simulator predicts the peak under a 50 ms TPOT for the decode
    deployment (EP144); a day-long service average must lie below that peak but not far below
    (Step-3's long-run average is 3% under its peak: 3,910 vs 4,039)."""
    dep = Deployment("colocated", H800, H800, ep=144, micro_batches=2)
    r = max_batch_for_tpot(DSV3, dep, 5120, 50.0)
    assert r is not None and r.fits and r.tpot_ms <= 50
    assert 1.0 <= r.tokens_per_gpu_s / 1850 <= 1.35, r.tokens_per_gpu_s


def test_prediction_for_a_decode_run_measured_on_this_machine(tmp_path):
    """The simulator with this machine's measured figures against afdserve's own decode of the
    `small` preset, measured right after (one thread, batch 4): nothing in it was fitted to this
    run. Idle, repeated rounds agree within 25% (docs/simulator.md); a single round on a shared,
    loaded CI machine moves by 10-30% between the minute the figures are measured and the minute
    the engine runs, so one round is held to a factor of two: enough to catch a model that drops
    or double-counts a stage (the layer overheads alone are ~40% of the step)."""
    torch = pytest.importorskip("torch")
    from afdserve.config import get_preset
    from afdserve.model.checkpoint import init_checkpoint
    from afdserve.sim import local
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        init_checkpoint(get_preset("small"), tmp_path, seed=0)
        batch, prompt, tokens = 4, 16, 12
        fig = local.measure_cpu(1, quick=True)
        over = local.measure_layer_overheads(1, batch, quick=True)
        pred = local.predict_colocated(local.small_arch(tmp_path), fig, over, batch, prompt + tokens // 2)
        measured = local.measure_engine_decode(str(tmp_path), batch, tokens, prompt)
    finally:
        torch.set_num_threads(old)
    ratio = pred.tokens_per_gpu_s / measured
    print(f"predicted {pred.tokens_per_gpu_s:.1f} tok/s, measured {measured:.1f} (x{ratio:.2f})")
    assert 0.5 <= ratio <= 2.0


# ----- the efficiency file -----

def test_efficiency_file_documents_every_value():
    data = json.loads(open("afdserve/sim/efficiency.json").read())
    calibrated = []
    for profile, values in data["profiles"].items():
        for name, v in values.items():
            assert v["source"] and isinstance(v["value"], (int, float)), (profile, name)
            if v.get("calibrated"):
                calibrated.append(name)
    assert sorted(calibrated) == ["colocated_a2a_efficiency", "hbm_efficiency"]


# ----- physics -----

def test_longer_context_costs_more_attention_and_throughput():
    r4 = simulate(STEP3, afd(2, 2), 4096, 3072)
    r32 = simulate(STEP3, afd(2, 2), 32768, 3072)
    assert r32.stage_us["attention"] > 3 * r4.stage_us["attention"]
    assert r32.stage_us["ffn"] == pytest.approx(r4.stage_us["ffn"])
    assert r32.tokens_per_gpu_s < r4.tokens_per_gpu_s


def test_bf16_attention_doubles_kv_and_halves_flop_rate():
    eff = load_efficiency()
    f8 = attention_time(STEP3, H800, 128, 8192, SimPrecision.for_attention("fp8"), eff)
    b16 = attention_time(STEP3, H800, 128, 8192, SimPrecision.for_attention("bf16"), eff)
    assert b16["core"] == pytest.approx(2 * f8["core"], rel=0.01)
    assert b16["linear"] == pytest.approx(2 * f8["linear"], rel=0.01)   # BF16 projection GEMMs
    kv8 = simulate(STEP3, afd(2, 2), 4096, 6144).memory["attention"]["kv_gb"]
    kv16 = simulate(STEP3, afd(2, 2), 4096, 6144, SimPrecision.for_attention("bf16"))
    assert kv16.memory["attention"]["kv_gb"] == pytest.approx(2 * kv8)
    assert not kv16.fits                      # 2 x 49 GB of KV per attention GPU


def test_more_attention_instances_at_long_context():
    two = max_batch_for_tpot(STEP3, afd(2, 2), 32768, 50.0)
    six = max_batch_for_tpot(STEP3, afd(6, 2), 32768, 50.0)
    assert six.batch > 2 * two.batch
    assert six.tokens_per_gpu_s > two.tokens_per_gpu_s


def test_more_micro_batches_hide_more_but_tpot_is_monotone_in_batch():
    tpots = [simulate(STEP3, afd(2, 2), 4096, b).tpot_ms for b in (768, 1536, 3072, 6144)]
    assert tpots == sorted(tpots)
    one = simulate(STEP3, afd(2, 2, m=1), 4096, 6144)
    three = simulate(STEP3, afd(2, 2, m=3), 4096, 6144)
    assert three.tpot_ms < one.tpot_ms


def test_heterogeneous_hardware_and_memory_check():
    h20 = get_hardware("H20")
    r = simulate(STEP3, afd(2, 2, a=h20, f=H800), 8192, 2048)
    assert r.deployment == "2A2F x8 H20+H800"
    assert r.memory["attention"]["usable_gb"] == pytest.approx(96 * 0.9)
    # One FFN GPU cannot hold Step-3's experts.
    tiny = Deployment("afd", H800, H800, 1, 1, 1, micro_batches=3)
    assert not simulate(STEP3, tiny, 4096, 30).fits


def test_parse_afd():
    assert parse_afd("3a2f") == (3, 2)
    for bad in ("2A", "0A1F", "AF", "2x2F"):
        with pytest.raises(ValueError):
            parse_afd(bad)


# ----- planner -----

def test_planner_ranks_feasible_deployments():
    q = PlanQuery(STEP3, (H800,), 4096, 50.0, max_gpus=32)
    out = plan(q, top=5)
    tps = [r["tokens_per_gpu_s"] for r in out["by_throughput"]]
    cost = [r["usd_per_mtok"] for r in out["by_cost"]]
    assert tps == sorted(tps, reverse=True) and cost == sorted(cost)
    assert all(r["tpot_ms"] <= 50 and r["fits"] and r["gpus"] <= 32
               for r in out["by_throughput"])
    kinds = {r["kind"] for r in out["by_throughput"] + out["by_cost"]}
    assert "afd" in kinds


# ----- CLI -----

def test_cli_simulate_afd_json():
    p = run_cli("simulate", "--model", "step3", "--afd", "2A2F", "--gpus-per-instance", "8",
                "--attention-hw", "H800", "--ffn-hw", "H800", "--context", "4096",
                "--batch", "6144", "--micro-batches", "3", "--tpot-ms", "50",
                "--attention-precision", "fp8", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(PAPER_KEYS) <= set(out)
    assert set(out["stage_us"]) >= {"attention", "ffn", "a2f", "f2a"}
    assert out["batch"] == 6144 and out["gpus"] == 32
    assert out["tokens_per_gpu_s"] == pytest.approx(4039, rel=0.05)


def test_cli_simulate_colocated_json_and_no_torch():
    code = ("import sys; from afdserve.cli import main; "
            "rc = main(['simulate', '--model', 'deepseek-v3', '--colocated-ep', '128', "
            "'--hardware', 'H800', '--context', '4096', '--tpot-ms', '50', '--json']); "
            "assert 'torch' not in sys.modules, 'sim imported torch'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(PAPER_KEYS) <= set(out) and out["gpus"] == 128
    assert out["tokens_per_gpu_s"] == pytest.approx(2324, rel=0.05)


@pytest.mark.parametrize("args, msg", [
    (["--afd", "2B2F", "--hardware", "H800"], "invalid AFD topology '2B2F'"),
    (["--afd", "2A2F", "--colocated-ep", "8", "--hardware", "H800"], "exactly one"),
    (["--afd", "2A2F", "--attention-hw", "H999", "--ffn-hw", "H800"], "unknown hardware"),
    (["--afd", "2A2F", "--hardware", "H800", "--context", "-5"], "bad context"),
    (["--afd", "2A2F", "--hardware", "H800", "--tpot-ms", "0"], "must be positive"),
])
def test_cli_errors_are_one_line(args, msg):
    p = run_cli("simulate", "--model", "step3", *args)
    assert p.returncode == 2
    assert msg in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_cli_plan_json_and_plot(tmp_path):
    png = tmp_path / "pareto.png"
    p = run_cli("plan", "--model", "step3", "--hardware", "H800", "--context", "4096",
                "--tpot-ms", "50", "--max-gpus", "24", "--top", "3", "--json",
                "--plot", str(png))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["by_throughput"] and out["by_cost"]
    assert png.stat().st_size > 10_000


def test_measured_gemm_table_drives_the_simulated_gemm_time():
    from afdserve.cost.hardware import Hardware
    from afdserve.sim.simulator import SimPrecision, _gemm_part, load_efficiency

    hw = Hardware(name="t", usd_per_hour=1.0, bf16_flops=1e11, fp8_flops=1e11, hbm_bytes_per_s=1e12,
                  memory_bytes=1e9, nic_bytes_per_s=1e9, gpus_per_node=1, source="test")
    prec = SimPrecision(weight_bytes=4, kv_bytes=4, a2f_bytes=4, f2a_bytes=4, a2f_scales=False)
    # measured seconds per weight at 1, 4, 8 rows -> efficiencies of the 1e11 FLOP/s peak
    table = {1: 1e-10, 4: 4e-10, 8: 3e-10}
    eff = load_efficiency("cpu", gemm_table=tuple((n, 2 * n / (t * 1e11)) for n, t in table.items()))
    for rows, t in table.items():
        assert _gemm_part(hw, 1e6, rows, prec, eff) == pytest.approx(1e6 * t)
    # between points: efficiency interpolated; below the first point: time per weight of 1 row
    assert table[4] * 1e6 > _gemm_part(hw, 1e6, 6, prec, eff) > table[8] * 1e6
    assert _gemm_part(hw, 1e6, 0.5, prec, eff) == pytest.approx(1e6 * table[1])


def test_ffn_layers_use_their_own_measured_gemm_table():
    from afdserve.cost.hardware import Hardware
    from afdserve.sim.simulator import SimPrecision, ffn_time, load_efficiency

    hw = Hardware(name="t", usd_per_hour=1.0, bf16_flops=1e11, fp8_flops=1e11, hbm_bytes_per_s=1e13,
                  memory_bytes=1e9, nic_bytes_per_s=1e9, gpus_per_node=1, source="test")
    prec = SimPrecision(weight_bytes=4, kv_bytes=4, a2f_bytes=4, f2a_bytes=4, a2f_scales=False)
    arch = get_model("step3")
    table = ((1, 0.2), (64, 0.4))
    one = load_efficiency("cpu", gemm_table=table, ffn_layer_overhead_us=0.0)
    split = load_efficiency("cpu", gemm_table=table, ffn_gemm_table=((1, 0.1), (64, 0.2)), ffn_layer_overhead_us=0.0)
    assert one.for_ffn() is one and split.for_ffn().gemm_table == ((1, 0.1), (64, 0.2))
    # half the efficiency on every FFN GEMM: the FFN layer takes twice as long (compute bound here)
    for moe in (True, False):
        assert ffn_time(arch, hw, 64, 1, moe, prec, split) == pytest.approx(2 * ffn_time(arch, hw, 64, 1, moe, prec, one))
    # the attention projections keep the main table
    assert attention_time(arch, hw, 8, 4096, prec, split)["linear"] == \
        attention_time(arch, hw, 8, 4096, prec, one)["linear"]


def test_expert_time_averages_over_the_binomial_rows_per_expert():
    from afdserve.cost.hardware import Hardware
    from afdserve.sim.simulator import SimPrecision, _expert_gemm, _gemm_part, load_efficiency

    hw = Hardware(name="t", usd_per_hour=1.0, bf16_flops=1e11, fp8_flops=1e11, hbm_bytes_per_s=1e12,
                  memory_bytes=1e9, nic_bytes_per_s=1e9, gpus_per_node=1, source="test")
    prec = SimPrecision(weight_bytes=4, kv_bytes=4, a2f_bytes=4, f2a_bytes=4, a2f_scales=False)
    eff = load_efficiency("cpu", gemm_table=((1, 0.2), (2, 0.1), (3, 0.3)))
    # 2 tokens, p = 1/2: rows 0 (1/4, not read), 1 (1/2), 2 (1/4)
    want = 0.5 * _gemm_part(hw, 1e6, 1, prec, eff) + 0.25 * _gemm_part(hw, 1e6, 2, prec, eff)
    assert _expert_gemm(hw, 1e6, 2, 0.5, prec, eff) == pytest.approx(want)
    # many rows per expert: the mean is used
    assert _expert_gemm(hw, 1e6, 4096, 0.5, prec, eff) == pytest.approx(_gemm_part(hw, 1e6, 2048, prec, eff))


def test_link_latency_fit_recovers_the_latency_that_produced_a_step():
    import dataclasses

    from afdserve.sim import local

    fig = local.CpuFigures(1, 10e9, 50e9, 5.0, ((1, 4e-10), (8, 2e-9), (64, 1.2e-8)), 0.0, 3e9)
    over = local.LayerOverheads(500.0, 800.0)
    arch = local.arch_of(local.narrow_config())
    truth = dataclasses.replace(fig, p2p_latency_us=1234.0)
    step = local.predict_afd(arch, truth, truth, over, 8, 64, 2).tpot_ms / 1e3
    assert local.fit_link_latency(fig, over, 8, 64, 2, step) == pytest.approx(1234.0, rel=1e-3)
    assert local.fit_link_latency(fig, over, 8, 64, 2, 1e-9) == 0.0


def test_cpu_measurement_with_a_neighbour_runs_it_and_always_stops_it(monkeypatch):
    from afdserve.sim import local

    started = []
    real = local._start_neighbour

    def spy():
        proc = real()
        assert proc.poll() is None                         # streaming while we measure
        started.append(proc)
        return proc

    monkeypatch.setattr(local, "_start_neighbour", spy)
    fig = local.measure_cpu(1, quick=True, neighbour=True)
    for table in (fig.gemm_seconds_per_weight, fig.ffn_gemm_seconds_per_weight):   # attention and FFN shapes
        assert [n for n, _ in table] == list(local.GEMM_ROWS) and all(t > 0 for _, t in table)
    assert fig.read_bytes_per_s > 0
    assert started and started[0].poll() is not None      # killed and reaped afterwards
    # ... also when the measurement fails half-way
    monkeypatch.setattr(local, "decode_weights", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        local.measure_cpu(1, quick=True, neighbour=True)
    assert len(started) == 2 and started[1].poll() is not None
