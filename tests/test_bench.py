"""`afdserve bench` at a tiny size: the JSON's figures are consistent with each other and with the
limits they divide by; the accounting, roofline and target arithmetic against hand counts; the
peer's timing statistic on a duck-typed model; colocated vs AFD on equal threads."""
from __future__ import annotations

import argparse
import json

import pytest

torch = pytest.importorskip("torch")

from afdserve.bench import attention, cli, decode, machine, peer  # noqa: E402
from afdserve.model import kernels  # noqa: E402
from afdserve.config import get_preset  # noqa: E402


def _args(tmp_path, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    a = p.parse_args(["--out", str(tmp_path / "out"), "--preset", "tiny", "--batches", "1,2", "--contexts", "16",
                      "--steps", "2", "--warmup", "1", "--threads", "1", "--attn-batch", "2",
                      "--attn-contexts", "16", "--bandwidth-mib", "16", "--matmul-n", "128",
                      "--micro-batches", "1", "--afd-topology", "not-a-topology", *extra])
    return cli.resolve(a)


def test_bench_run_writes_json_with_expected_keys(tmp_path):
    args = _args(tmp_path)
    assert cli.run(args) == 0
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    for key in ("machine", "model", "decode", "targets", "attention", "afd", "profile", "settings", "command"):
        assert key in r, key
    m = r["machine"]
    assert {"bandwidth", "matmul", "description"} <= set(m)
    assert m["description"]["torch_threads"] == 1 and m["bandwidth"]["threads"] == 1 == m["matmul"]["threads"]
    bw = m["bandwidth"]["bytes_per_s"]
    # The limit is the fastest read kernel of the run: none of ours (GEMV, decode GEMMs) exceeds it.
    assert bw == max(m["bandwidth"]["kernels"].values())
    assert {"torch.sum", "torch copy", "numpy sum"} <= set(m["bandwidth"]["kernels"])
    for row in m["weight_streaming"]["rows"].values():               # BLAS and afdserve's kernels
        assert 0 < row["bytes_per_s"] <= bw and 0 < row["engine_bytes_per_s"] <= bw
        assert row["flops_per_s"] <= m["matmul"]["flops_per_s"] >= row["engine_flops_per_s"]
    assert [(d["batch"], d["context"]) for d in r["decode"]] == [(1, 16), (2, 16)]
    for d in r["decode"]:
        assert d["steps_timed"] == 2 and d["tokens_per_s"] == pytest.approx(d["batch"] / d["step_s"])
        rf = d["roofline"]
        assert rf["bandwidth_fraction"] == pytest.approx(rf["bytes_per_step"] / d["step_s"] / bw)
        assert rf["matmul_fraction"] == pytest.approx(rf["flops_per_step"] / d["step_s"] / m["matmul"]["flops_per_s"])
        if peer.available():
            assert d["ratio_vs_peer"] == pytest.approx(d["tokens_per_s"] / d["peer"]["tokens_per_s"])
    assert "batch1_ctx128_bandwidth_fraction" not in r["targets"]     # context 16 only
    designs = {a["design"] for a in r["attention"]["rows"]}
    assert designs == set(attention.DESIGNS)
    modes = r["afd"]["rows"]
    assert modes[0]["mode"] == "colocated" and modes[0]["tokens_per_s"] == pytest.approx(2 / modes[0]["step_s"])
    assert "unavailable" in modes[1]                                   # a bad topology is recorded, not fatal
    assert (tmp_path / "out" / "decode.png").is_file()
    assert "tok/s" in (tmp_path / "out" / "summary.md").read_text()


def test_memory_aware_skip(tmp_path):
    args = _args(tmp_path, "--memory-fraction", "0", "--no-peer", "--no-attention", "--no-afd", "--no-profile")
    r = cli.run_bench(args, log=lambda m: None)
    assert all("skipped" in d for d in r["decode"])


def test_accounting():
    c = get_preset("small")
    b1 = decode.step_bytes(c, 1, 128, 4)
    assert b1["kv"] == 128 * 12 * 2 * 128 * 4
    assert b1["distinct_experts_per_moe_layer"] == pytest.approx(3.0)
    assert decode.expected_distinct_experts(16, 3, 64) == pytest.approx(16, rel=1e-3)
    big = decode.step_bytes(c, 64, 128, 4)
    assert big["weights"] > b1["weights"]
    p = attention.predict("mfa", 8, 1024, 4, 1e10, 1e11)
    assert p["kv_elems_per_token"] == 256 and p["arithmetic_intensity"] == pytest.approx(8.0)
    assert attention.predict("gqa", 8, 1024, 4, 1e10, 1e11)["kv_elems_per_token"] == 1024
    assert attention.predict("mla", 8, 1024, 4, 1e10, 1e11)["kv_elems_per_token"] == 576


@pytest.mark.skipif(not peer.available(), reason="transformers is not installed")
def test_peer_matches_active_width():
    c = get_preset("small")
    cfg = peer.peer_config(c)
    assert cfg.num_key_value_heads == 1 and cfg.head_dim == 128 and cfg.num_attention_heads == 16
    assert cfg.num_experts_per_tok * cfg.moe_intermediate_size == c.moe_top_k * c.moe_intermediate_size + c.share_expert_dim
    assert list(cfg.mlp_only_layers) == [0, 1, 11]


def _active_counts(preset: str, experts_hit: float):
    """(weights one token multiplies by, bytes-worth of parameters a batch-1 step reads) counted
    from the model's own parameters: routed experts weighted by the share of them hit."""
    from afdserve.model.step3 import Step3ForCausalLM
    c = get_preset(preset)
    model = Step3ForCausalLM(c)
    matmul, read = 0, c.hidden_size                      # one embedding row is read
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        routed = p.dim() == 3                             # [experts, out, in]
        if p.dim() >= 2:
            matmul += p.numel() * (c.moe_top_k / c.moe_num_experts if routed else 1)
        read += p.numel() * (experts_hit / c.moe_num_experts if routed else 1)
    return c, matmul, read


def test_flops_and_bytes_match_the_models_parameters():
    c, matmul, read = _active_counts("tiny", experts_hit=3)
    assert decode.step_flops(c, 1, 0) == pytest.approx(2 * matmul)
    assert decode.step_flops(c, 5, 0) == pytest.approx(10 * matmul)
    # QK^T and PV: 2 x heads x head_dim multiply-adds per cached token and layer each
    per_ctx = 2 * 2 * c.num_attention_heads * c.head_dim * c.num_hidden_layers
    assert decode.step_flops(c, 1, 100) - decode.step_flops(c, 1, 0) == pytest.approx(100 * per_ctx)
    b = decode.step_bytes(c, 1, 0, 4, distinct_experts=3)
    assert b["weights"] == pytest.approx(4 * read) and b["kv"] == 0


def test_roofline_arithmetic():
    c = get_preset("tiny")
    r = {"batch": 2, "mean_context": 10.0, "step_s": 0.5, "distinct_experts": [3.0, 3.0]}
    by = decode.step_bytes(c, 2, 10.0, 4, [3.0, 3.0])["total"]
    fl = decode.step_flops(c, 2, 10.0)
    # bandwidth-bound machine: 1 byte/s x 2 s per step would be the floor
    rf = decode.roofline(c, r, bandwidth=by / 0.25, matmul=fl / 0.1, elem=4)
    assert rf["bandwidth_fraction"] == pytest.approx(0.5) and rf["matmul_fraction"] == pytest.approx(0.2)
    assert rf["roofline_step_s"] == pytest.approx(0.25) and rf["roofline_efficiency"] == pytest.approx(0.5)
    rf = decode.roofline(c, r, bandwidth=by / 0.1, matmul=fl / 0.4, elem=4)      # compute-bound
    assert rf["roofline_step_s"] == pytest.approx(0.4) and rf["roofline_efficiency"] == pytest.approx(0.8)
    assert rf["achieved_bytes_per_s"] == pytest.approx(by / 0.5)


def _row(batch, context, bw_frac=None, ratio=None):
    row = {"batch": batch, "context": context, "roofline": {"bandwidth_fraction": bw_frac}}
    if ratio is not None:
        row["ratio_vs_peer"] = ratio
    return row


def test_targets_arithmetic():
    t = cli._targets([_row(1, 128, 0.6), _row(8, 128, 0.3, 1.7), _row(64, 4096, 0.2, 1.49),
                      _row(4, 128, 0.1, 0.5), {"batch": 32, "context": 128, "skipped": "memory"}])
    assert t["batch1_ctx128_bandwidth_fraction"] == {"value": 0.6, "target": 0.6, "met": True}
    # the worst ratio among batch >= 8 rows (batch 4's 0.5 does not count)
    assert t["batch8plus_min_ratio_vs_peer"] == {"value": 1.49, "target": 1.5, "met": False}
    t = cli._targets([_row(1, 128, 0.59), _row(8, 128, 0.3, 1.5)])
    assert not t["batch1_ctx128_bandwidth_fraction"]["met"] and t["batch8plus_min_ratio_vs_peer"]["met"]
    assert cli._targets([_row(1, 1024, 0.9)]) == {}


def test_bandwidth_limit_is_the_fastest_read_kernel():
    r = machine.measure_bandwidth("cpu", 8 << 20, repeats=2)
    assert r["bytes_per_s"] == max(r["kernels"].values()) and r["kernels"][r["kernel"]] == r["bytes_per_s"]
    assert {"torch.sum", "torch copy", "numpy sum"} <= set(r["kernels"])
    assert ("afdserve native GEMV" in r["kernels"]) == kernels.NATIVE
    # a decode GEMM that streamed faster raises the limit, and says so
    fast = 2 * r["bytes_per_s"]
    mm = {"flops_per_s": 1e9, "method": "best of 5"}
    rows = {"8": {"bytes_per_s": 1.0, "engine_bytes_per_s": fast, "flops_per_s": 3e9, "engine_flops_per_s": 2e9}}
    machine.raise_limits(r, {"rows": rows}, mm)
    assert r["bytes_per_s"] == fast and r["kernel"] == "decode GEMM M=8 (afdserve)" and "raised" in r["method"]
    assert mm["flops_per_s"] == 3e9 and mm["kernel"] == "decode GEMM M=8 (BLAS)" and "raised" in mm["method"]
    slow = {"flops_per_s": 1e12, "method": "best of 5"}
    machine.raise_limits(r, {"rows": rows}, slow)
    assert slow == {"flops_per_s": 1e12, "method": "best of 5"}        # not raised: nothing faster


def test_limits_measured_twice_keep_each_kernels_best():
    def limits(sum_rate, gemm_rate, flops):
        return {"bandwidth": {"bytes_per_s": max(sum_rate, gemm_rate), "method": "best of 5; raised",
                              "kernels": {"torch.sum": sum_rate, "decode GEMM M=1 (afdserve)": gemm_rate}},
                "matmul": {"flops_per_s": flops, "method": "best of 5 runs of torch.mm"},
                "weight_streaming": {"rows": {"1": {"bytes_per_s": 1.0, "engine_bytes_per_s": gemm_rate}}}}
    m = limits(10.0, 12.0, 100.0)
    machine.merge_limits(m, limits(14.0, 11.0, 90.0))
    assert m["bandwidth"]["kernels"] == {"torch.sum": 14.0, "decode GEMM M=1 (afdserve)": 12.0}
    assert m["bandwidth"]["bytes_per_s"] == 14.0 and m["bandwidth"]["kernel"] == "torch.sum"
    assert "before and after the decode grid" in m["bandwidth"]["method"]
    assert m["matmul"]["flops_per_s"] == 100.0 and "before and after" in m["matmul"]["method"]
    assert m["weight_streaming"]["rows"]["1"]["engine_bytes_per_s"] == 12.0


def test_limits_lines_name_method_and_denominators():
    m = {"bandwidth": {"bytes_per_s": 2e10, "method": "best of 5", "kernels": {"torch.sum": 2e10}},
         "matmul": {"flops_per_s": 3e11, "method": "best of 5 runs of torch.mm", "dtype": "float32", "n": 64,
                    "threads": 2}}
    text = "\n".join(cli.limits_lines(m))
    assert "20.0 GB/s: best of 5" in text and "300.0 GFLOP/s" in text and "2 thread(s)" in text
    assert "% BW = " in text and "% FLOP = " in text


def test_afd_runs_on_equal_threads(tmp_path, monkeypatch):
    """AFD workers get threads // workers each (passed to the executor); colocated runs with all the
    run's threads and with one worker's share, and the ratios divide by the matching row."""
    seen = []

    def fake(model_dir, b, c, steps, warmup, device, dtype, afd=None, micro_batches=1, afd_options=None,
             quantization=None, kv_cache_dtype="auto"):
        threads = afd_options["threads_per_worker"] if afd else torch.get_num_threads()
        seen.append((afd, threads, afd_options))
        step = {None: 1.0}.get(afd, 0.8) * (0.5 if threads == 4 else 1.0)    # 4 threads: twice as fast
        return {"tokens_per_s": b / step, "tpot_ms": 1e3 * step, "step_s": step, "steps_timed": steps}

    monkeypatch.setattr(decode, "measure_decode", fake)
    args = _args(tmp_path, "--threads", "4", "--afd-topology", "1A1F", "--micro-batches", "1,2")
    res = cli._afd(args, tmp_path, log=lambda m: None)
    assert res["threads_per_worker"] == 2 and "2 thread(s) each" in res["note"] and "same total cores" in res["note"]
    assert [(a, t) for a, t, _ in seen] == [(None, 4), (None, 2), ("1A1F", 2), ("1A1F", 2)]
    assert all(o["timeout_s"] == args.afd_timeout for a, _, o in seen if a)
    rows = res["rows"]
    assert [r["threads"] for r in rows] == [4, 2, 2, 2] and "vs_colocated" not in rows[1]
    for r in rows[2:]:
        assert r["vs_colocated"] == pytest.approx(0.5 / 0.8) and r["vs_colocated_share"] == pytest.approx(1 / 0.8)
    assert cli._threads_per_worker("2A1F", 8) == 2 and cli._threads_per_worker("1A1F", 1) == 1
    assert cli._threads_per_worker("bad", 3) == 3
    args = _args(tmp_path, "--threads", "1", "--afd-topology", "1A1F", "--micro-batches", "1")
    assert "AFD uses 2 in all: more cores" in cli._afd(args, tmp_path, log=lambda m: None)["note"]


class _FakeCache:
    def __init__(self, length):
        self.length, self.lengths_at_start = length, []

    def get_seq_length(self):
        return self.length

    def crop(self, n):
        self.length += n if n < 0 else 0


class _FakePeer(torch.nn.Module):
    """Duck-typed generate: a slow first token (set-up), steady steps, one slow outlier step."""

    def __init__(self, cache, steady_s, outlier_s):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = argparse.Namespace(vocab_size=50)
        self.cache, self.steady_s, self.outlier_s = cache, steady_s, outlier_s
        self.calls = []

    def generate(self, input_ids, attention_mask, past_key_values, max_new_tokens, min_new_tokens,
                 stopping_criteria, **kw):
        import time
        assert past_key_values is self.cache and min_new_tokens == max_new_tokens
        self.calls.append((self.cache.length, max_new_tokens))
        ids = input_ids
        for i in range(max_new_tokens):
            time.sleep(4 * self.steady_s if i == 0 else self.outlier_s if i == 2 else self.steady_s)
            self.cache.length += 1
            ids = torch.cat([ids, ids[:, :1]], 1)
            for crit in stopping_criteria:
                assert not crit(ids, None).any()
        return ids


def test_peer_statistic_is_the_median_decode_step(monkeypatch):
    cache = _FakeCache(16)
    monkeypatch.setattr(peer, "_prefilled_cache", lambda model, b, c: cache)
    model = _FakePeer(cache, steady_s=0.01, outlier_s=0.2)
    r = peer.measure_peer(model, batch=3, context=16, steps=6, repeats=3)
    # warm-up + 3 runs of steps + 1 tokens, each starting from the pre-filled context
    assert model.calls == [(16, 2)] + [(16, 7)] * 3
    assert r["repeats"] == 3 and len(r["run_medians_s"]) == 3 and r["steps"] == 6
    # the median ignores the set-up (first token) and the outlier; a mean would be >= 0.04 s
    assert 0.01 <= r["step_s"] < 0.03
    assert r["tokens_per_s"] == pytest.approx(3 / r["step_s"])


@pytest.mark.skipif(not peer.available(), reason="transformers is not installed (the bench extra)")
def test_peer_runs_on_tiny_model():
    model = peer.build_peer(get_preset("tiny"))
    r = peer.measure_peer(model, 2, 16, steps=3, repeats=2)
    assert r["steps"] == 3 and len(r["run_medians_s"]) == 2 and r["tokens_per_s"] == pytest.approx(2 / r["step_s"])
