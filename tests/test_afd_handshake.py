"""AFD start-up refusals through the public entry points: an engine-side `AFDExecutor` whose FFN
role is remote (`ffn_remote=True`) and the `afdserve worker --role ffn` command that joins it.

Each refusal must end both sides with an error that names the problem: the worker exits with
code 2 and a one-line reason, and the executor raises ExecutorError with the same reason (no
hang, no bare traceback). The checkpoint-mismatch refusal is tested in test_afd.py.
"""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from afdserve.afd.config import AFDConfig
from afdserve.afd.executor import AFDExecutor, free_port
from afdserve.config import Step3Config
from afdserve.engine.executor import ExecutorError

# Generous on a loaded 2-core machine: the local attention worker imports torch and loads the model
# inside the join window.
JOIN_S = 60.0


def _worker(ckpt, port: int, *args: str, join_timeout: float = JOIN_S) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "afdserve", "worker", "--role", "ffn", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "--model", str(ckpt), "--join-timeout", str(join_timeout),
           "--threads", "1", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the worker did not exit within {timeout:g} s:\n{err[-2000:]}")
    return proc.returncode, err


class _Engine:
    """AFDExecutor(ffn_remote=True) constructed in a thread; `error` is what its start-up raised."""

    def __init__(self, ckpt, port: int, topology: str = "1A1F", join_timeout_s: float = JOIN_S):
        self.error: BaseException | None = None
        self.executor = None

        def start():
            try:
                afd = AFDConfig(topology, ffn_remote=True, master_port=port, join_timeout_s=join_timeout_s,
                                timeout_s=20.0, threads_per_worker=1)
                self.executor = AFDExecutor(ckpt, Step3Config.from_file(ckpt), afd, dtype="float32")
            except BaseException as exc:     # recorded for the test to inspect
                self.error = exc
        self.thread = threading.Thread(target=start, daemon=True)
        self.thread.start()

    def result(self, timeout: float) -> BaseException | None:
        self.thread.join(timeout)
        if self.executor is not None:
            self.executor.close()
        assert not self.thread.is_alive(), f"the executor's start-up did not end within {timeout:g} s"
        return self.error


@pytest.mark.parametrize("worker_args, reason", [
    (["--afd", "1A1F", "--rank", "0", "--dtype", "bfloat16"], "uses dtype torch.bfloat16, attention worker 0 uses torch.float32"),
    (["--afd", "1A2F", "--rank", "0", "--dtype", "float32"], "was started for topology 1A2F, attention worker 0 for 1A1F"),
    (["--afd", "1A1F", "--rank", "0", "--dtype", "float32", "--quantization", "fp8"],
     "uses quantization fp8, attention worker 0 uses none"),
], ids=["dtype", "topology", "quantization"])
def test_mismatched_worker_is_refused_on_both_sides(tiny_ckpt, worker_args, reason):
    port = free_port()
    engine = _Engine(tiny_ckpt, port)
    proc = _worker(tiny_ckpt, port, *worker_args)
    code, err = _finish(proc, JOIN_S + 60)
    exc = engine.result(JOIN_S + 60)
    assert code == 2 and "configuration mismatch" in err and reason in err, err[-2000:]
    assert "Traceback" not in err
    assert isinstance(exc, ExecutorError) and reason in str(exc), exc


def test_ffn_rank_that_never_joins(tiny_ckpt):
    port = free_port()
    exc = _Engine(tiny_ckpt, port, join_timeout_s=15.0).result(15.0 + 120)
    assert isinstance(exc, ExecutorError), exc
    assert "ffn worker 0 (rank 1)" in str(exc) and "did not join within 15 s" in str(exc)
    assert f"127.0.0.1:{port}" in str(exc)


def test_unreachable_rendezvous(tiny_ckpt):
    port = free_port()                  # nothing listens there
    code, err = _finish(_worker(tiny_ckpt, port, "--afd", "1A1F", "--rank", "0", join_timeout=2.0), 120)
    assert code == 2 and f"cannot reach the rendezvous at 127.0.0.1:{port}" in err, err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("args, reason", [
    (["--role", "attention", "--afd", "1A1F", "--rank", "0"], "attention workers are started by the engine process"),
    (["--role", "ffn", "--afd", "1A1F", "--rank", "1"], "--rank 1 is outside 0..0"),
    (["--role", "ffn", "--afd", "1X1F", "--rank", "0"], "invalid AFD topology '1X1F'"),
], ids=["attention-role", "rank-outside-role", "bad-topology"])
def test_worker_joining_as_the_wrong_role_is_refused_before_joining(tiny_ckpt, args, reason):
    p = subprocess.run([sys.executable, "-m", "afdserve", "worker", *args, "--master-addr", "127.0.0.1",
                        "--master-port", str(free_port()), "--model", str(tiny_ckpt)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and reason in p.stderr and "Traceback" not in p.stderr, p.stderr

