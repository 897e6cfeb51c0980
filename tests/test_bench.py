"""`afdserve bench` at a tiny size: the code runs and the JSON has the expected keys (no timing checks)."""
from __future__ import annotations

import argparse
import json

import pytest

torch = pytest.importorskip("torch")

from afdserve.bench import attention, cli, decode, peer  # noqa: E402
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
    assert {"bandwidth", "matmul", "description"} <= set(r["machine"])
    assert r["machine"]["bandwidth"]["bytes_per_s"] > 0 and r["machine"]["matmul"]["flops_per_s"] > 0
    assert r["machine"]["description"]["torch_threads"] == 1
    for row in r["machine"]["weight_streaming"]["rows"].values():     # BLAS and afdserve's kernels
        assert row["bytes_per_s"] > 0 and row["engine_bytes_per_s"] > 0
    assert [(d["batch"], d["context"]) for d in r["decode"]] == [(1, 16), (2, 16)]
    for d in r["decode"]:
        assert d["tokens_per_s"] > 0 and d["steps_timed"] == 2
        assert {"bandwidth_fraction", "matmul_fraction", "bytes_per_step", "flops_per_step"} <= set(d["roofline"])
        if peer.available():
            assert d["peer"]["tokens_per_s"] > 0 and d["ratio_vs_peer"] > 0
    assert "batch1_ctx128_bandwidth_fraction" not in r["targets"]     # context 16 only
    designs = {a["design"] for a in r["attention"]["rows"]}
    assert designs == set(attention.DESIGNS)
    modes = r["afd"]["rows"]
    assert modes[0]["mode"] == "colocated" and modes[0]["tokens_per_s"] > 0
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
    assert decode.step_flops(c, 2, 128) == pytest.approx(2 * decode.step_flops(c, 1, 128))
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
