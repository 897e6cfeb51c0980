"""A worker's entry into a deployment: the rendezvous, the handshake, the process group.

Start-up and re-formation go through `rendezvous.py`: claim the rank, a hello that attention
worker 0's is compared with (mismatched roles are refused with the difference named), load,
then the process group of the current generation. A worker also leaves by itself when the
engine process that started it is gone (`watch_parent`).
"""
from __future__ import annotations

import os
import threading
import time

import torch

from afdserve.afd import rendezvous as rdv
from afdserve.afd.config import AFDConfig
from afdserve.afd.protocol import WorkerSpec
from afdserve.afd.rendezvous import HandshakeError
from afdserve.config import Step3Config
from afdserve.model.checkpoint import parse_dtype


def watch_parent(parent_pid: int | None) -> None:
    """Exit this process (without cleanup, which could block on dead peers) when the engine process
    `parent_pid` is gone or this process was re-parented."""
    if not parent_pid:
        return
    first_ppid = os.getppid()

    def alive() -> bool:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return os.getppid() == first_ppid

    def loop():
        while alive():
            time.sleep(0.25)
        os._exit(3)
    threading.Thread(target=loop, daemon=True, name="afd-parent-watch").start()


class Membership:
    """One worker's place in the deployment: store connection, generation, process group."""

    def __init__(self, spec: WorkerSpec, role: str, index: int):
        afd = spec.afd
        topo = afd.topology
        self.spec, self.role, self.index = spec, role, index
        self.rank = topo.attention_rank(index) if role == "attention" else topo.ffn_rank(index)
        self.who = rdv.describe(role, index)
        self.where = f"{afd.master_addr}:{afd.master_port}"
        self.store = rdv.connect_store(afd.master_addr, afd.master_port, afd.join_timeout_s, self.who)
        rdv.start_heartbeat(afd.master_addr, afd.master_port, self.rank, afd.heartbeat_s, afd.join_timeout_s)
        try:
            self.gen = rdv.current_generation(self.store)
        except Exception:
            raise HandshakeError(f"{self.who}: the engine at {self.where} announced no process group within "
                                 f"{afd.join_timeout_s:g} s") from None
        self.hello: dict | None = None
        self.pg = None

    def enter(self, config: Step3Config) -> AFDConfig:
        """Claim the rank and pass the handshake of the current generation; the deployment's
        settings with attention worker 0's runtime ones."""
        s, afd = self.spec, self.spec.afd
        if self.hello is None:
            # the weights' format in memory: asked for, or an FP8 checkpoint's own
            quant = s.quantization or (config.quantization_config.quant_method if config.quantization_config else None)
            self.hello = rdv.make_hello(afd.topology, self.role, self.index, str(parse_dtype(s.dtype)), s.model_dir,
                                        rdv.checkpoint_fingerprint(s.model_dir, config), afd.runtime(), quant)
        ref, self.gen = rdv.enter(self.store, self.gen, self.rank, self.hello, self.who, self.where,
                                  afd.join_timeout_s)
        return afd.adopt(ref["settings"])

    def form(self, error: str | None, device: str):
        """Exchange load errors (one failing role stops all), then form the generation's group."""
        topo = self.spec.afd.topology
        first = rdv.exchange_status(self.store, self.gen, self.rank, error, topo)
        if first:
            raise HandshakeError(first)
        self.pg = rdv.make_group(self.store, self.gen, self.rank, topo.world_size, device)
        return self.pg

    def rejoin(self, gen: int, config: Step3Config, device: str):
        self.pg, self.gen = None, gen
        self.enter(config)
        return self.form(None, device)


def worker_device(spec: WorkerSpec, rank: int) -> str:
    """The device of global rank `rank`: on a GPU node, one of the node's GPUs."""
    if spec.device == "cuda" and torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"   # local ranks share the node's GPUs
    return spec.device
