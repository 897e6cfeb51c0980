"""Rendezvous of an AFD deployment: the store, generations, the handshake, heartbeats.

The engine process (`AFDExecutor`) hosts a TCPStore on `master_addr:master_port`; every worker,
local or started with `afdserve worker --role ffn`, is a client of it. Because the store lives
in the engine process it outlives any worker, so the process group can be formed again after a
worker is lost: each formation is a *generation* g (keys under `afd/g{g}/`), announced by the
engine in `afd/generation`. Per generation every rank

    writes its hello (`hello/{rank}`: role, topology, dtype, checkpoint fingerprint), unless
        another process holds the rank already (then it waits for a generation that re-opens it:
        the engine has not yet seen the loss of the process it replaces; refused after the join
        timeout),
    waits for the engine's verdict (`verdict`: "ok", the mismatches judged against attention
        worker 0's hello, or "retry": a worker died mid-formation, join the next generation),
    writes its load status (`loaded/{rank}`: "" or the error) and waits for everyone's,
    forms a process group over the generation's keys (gloo on CPU, NCCL on GPU).

Heartbeats: every worker adds 1 to `afd/hb/{rank}` every `heartbeat_s` from a thread of its own
(a separate store connection), so the engine sees a stopped or hung process as a counter that no
longer moves, wherever the process runs.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import torch.distributed as dist

from afdserve.afd.topology import Topology
from afdserve.config import Step3Config

GENERATION_KEY = "afd/generation"
RETRY = "retry"


class HandshakeError(RuntimeError):
    """Roles started with different configurations, or a role that never joined."""


class DeploymentEnded(RuntimeError):
    """The engine process (and its store) is gone, or no new generation was announced in time."""


def describe(role: str, index: int) -> str:
    return f"{role} worker {index}"


def _prefix(gen: int) -> str:
    return f"afd/g{gen}/"


# ------------------------------------------------------------------ store
def host_store(addr: str, port: int, timeout_s: float) -> dist.TCPStore:
    """The engine's store (the server side, in the engine process)."""
    return dist.TCPStore(addr, port, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def connect_store(addr: str, port: int, timeout_s: float, who: str) -> dist.TCPStore:
    try:
        return dist.TCPStore(addr, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:
        raise HandshakeError(f"{who} cannot reach the rendezvous at {addr}:{port}: {exc}") from None


def announce_generation(store: dist.TCPStore, gen: int) -> None:
    store.set(GENERATION_KEY, str(gen))


def current_generation(store: dist.TCPStore) -> int:
    return int(store.get(GENERATION_KEY))


def wait_generation_after(store: dist.TCPStore, gen: int, timeout_s: float) -> int:
    """Block until the engine announces a generation newer than `gen` (DeploymentEnded otherwise)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            g = current_generation(store)
        except Exception as exc:
            raise DeploymentEnded(f"the rendezvous is gone ({str(exc).splitlines()[0] if str(exc) else exc})") from None
        if g > gen:
            return g
        time.sleep(0.05)
    raise DeploymentEnded(f"no new process group was formed within {timeout_s:g} s")


# ------------------------------------------------------------------ handshake, worker side
def checkpoint_fingerprint(model_dir: str | Path, config: Step3Config) -> str:
    """sha256 of the config and, per weight file, its name, size and first/last MiB of bytes."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for p in sorted(Path(model_dir).glob("*.safetensors")):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(2**20))
            f.seek(max(0, size - 2**20))
            h.update(f.read(2**20))
    return h.hexdigest()


def make_hello(topology: Topology, role: str, index: int, dtype: str, model_dir: str, fingerprint: str,
               settings: dict, quantization: str | None = None) -> dict:
    return {"role": role, "index": index, "topology": str(topology), "pid": os.getpid(),
            "host": os.uname().nodename, "dtype": dtype, "model_dir": str(model_dir),
            "checkpoint": fingerprint, "settings": settings, "quantization": quantization or "none"}


def enter(store: dist.TCPStore, gen: int, rank: int, hello: dict, who: str, where: str,
          timeout_s: float) -> tuple[dict, int]:
    """Take `rank` in generation `gen` (or a later one the engine moves to), say hello, wait for
    the verdict. Returns attention worker 0's hello and the generation joined."""
    text = json.dumps(hello)
    while True:
        p = _prefix(gen)
        if store.compare_set(f"{p}hello/{rank}", "", text).decode() != text:
            # Taken: by a live process, or by the one this process replaces, whose loss the
            # engine may not have seen yet; then the next generation opens the rank again.
            try:
                gen = wait_generation_after(store, gen, timeout_s)
            except DeploymentEnded:
                raise HandshakeError(f"{who}: rank {rank} is already taken in this deployment (another "
                                     f"process joined as {who}) and was not re-opened within {timeout_s:g} s") from None
            continue
        try:
            verdict = store.get(f"{p}verdict").decode()
        except Exception:
            raise HandshakeError(f"{who}: no verdict from the engine at {where} within {timeout_s:g} s") from None
        if verdict == RETRY:       # the engine restarted a worker mid-formation: join the next one
            gen = wait_generation_after(store, gen, timeout_s)
            continue
        if verdict != "ok":
            raise HandshakeError(verdict)
        return json.loads(store.get(f"{p}hello/0")), gen


def exchange_status(store: dist.TCPStore, gen: int, rank: int, error: str | None, topology: Topology) -> str | None:
    """Every rank's load error of this generation: the first one (named), or None."""
    p = _prefix(gen)
    store.set(f"{p}loaded/{rank}", error or "")
    store.wait([f"{p}loaded/{r}" for r in range(topology.world_size)])
    for r in range(topology.world_size):
        err = store.get(f"{p}loaded/{r}").decode()
        if err:
            return f"{describe(*topology.role_of(r))} failed to start: {err}"
    return None


def make_group(store: dist.TCPStore, gen: int, rank: int, world: int, device: str):
    """A process group object of its own (not the global default group), so it can be dropped
    and formed again. Long op timeout: FFN workers block in receives while the engine is idle;
    stalls are found by the attention side's per-wait timeout and by heartbeats."""
    pstore = dist.PrefixStore(f"{_prefix(gen)}pg/", store)
    timeout = datetime.timedelta(days=7)
    if device.startswith("cuda"):
        return dist.ProcessGroupNCCL(pstore, rank, world)
    return dist.ProcessGroupGloo(pstore, rank, world, timeout)


# ------------------------------------------------------------------ handshake, engine side
def judge(store: dist.TCPStore, gen: int, topology: Topology) -> str:
    """Compare every hello of generation `gen` with attention worker 0's; "ok" or the mismatches."""
    p = _prefix(gen)
    ref = json.loads(store.get(f"{p}hello/0"))
    problems = []
    for rank in range(1, topology.world_size):
        problems += _mismatches(ref, json.loads(store.get(f"{p}hello/{rank}")), rank, topology)
    if not problems:
        return "ok"
    return "AFD workers refused to start, configuration mismatch between roles: " + "; ".join(problems)


def hello_keys(gen: int, ranks) -> list[str]:
    return [f"{_prefix(gen)}hello/{r}" for r in ranks]


def read_hello(store: dist.TCPStore, gen: int, rank: int) -> dict:
    return json.loads(store.get(f"{_prefix(gen)}hello/{rank}"))


def publish_verdict(store: dist.TCPStore, gen: int, verdict: str) -> None:
    store.set(f"{_prefix(gen)}verdict", verdict)


def _mismatches(ref: dict, other: dict, rank: int, topology: Topology) -> list[str]:
    who = f"{describe(other['role'], other['index'])} (rank {rank}, pid {other['pid']} on {other['host']})"
    out = []
    if other["topology"] != ref["topology"]:
        out.append(f"{who} was started for topology {other['topology']}, attention worker 0 for {ref['topology']}")
    elif topology.role_of(rank)[0] != other["role"]:
        out.append(f"{who} joined at a rank that topology {ref['topology']} gives a {topology.role_of(rank)[0]} worker")
    if other["dtype"] != ref["dtype"]:
        out.append(f"{who} uses dtype {other['dtype']}, attention worker 0 uses {ref['dtype']}")
    if other.get("quantization", "none") != ref.get("quantization", "none"):
        out.append(f"{who} uses quantization {other.get('quantization', 'none')}, attention worker 0 uses "
                   f"{ref.get('quantization', 'none')}")
    if other["checkpoint"] != ref["checkpoint"]:
        out.append(f"{who} loads a different checkpoint or config ({other['model_dir']}, fingerprint "
                   f"{other['checkpoint'][:12]}) than attention worker 0 ({ref['model_dir']}, {ref['checkpoint'][:12]})")
    return out


# ------------------------------------------------------------------ heartbeats
def heartbeat_key(rank: int) -> str:
    return f"afd/hb/{rank}"


def start_heartbeat(addr: str, port: int, rank: int, interval_s: float, timeout_s: float) -> None:
    """Add 1 to this rank's counter every `interval_s` from a daemon thread (own connection)."""
    store = connect_store(addr, port, timeout_s, f"rank {rank}'s heartbeat")
    key = heartbeat_key(rank)

    def beat():
        while True:
            try:
                store.add(key, 1)
            except Exception:       # the engine is gone: the worker's own paths notice and exit
                return
            time.sleep(interval_s)
    threading.Thread(target=beat, daemon=True, name="afd-heartbeat").start()
