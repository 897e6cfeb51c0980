"""`AsyncEngine`: the synchronous `LLMEngine` behind an asyncio interface.

The engine is not thread-safe, so exactly one background thread owns it. Everything else talks
to that thread through a command queue (add / abort / stop); the thread hands outputs back to
each request's asyncio queue with `loop.call_soon_threadsafe`. When there is nothing to run the
thread sleeps on a condition variable (no busy loop; it wakes every IDLE_REFRESH_S to refresh
the stats snapshot); /health reads the engine's health live. An exception in the step loop fails every
in-flight request with its message and marks the engine unhealthy; the server keeps answering.

Threads: torch's intra-op thread count is left at the engine's default (torch picks the number
of cores); the step thread is the only one running torch, the event loop thread only does I/O.
"""
from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from afdserve.engine.engine import EngineDeadError, EngineStats, LLMEngine, RequestOutput
from afdserve.sampling import SamplingParams


IDLE_REFRESH_S = 1.0
"""How often the idle step thread refreshes the stats snapshot."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down or stopped; it takes no more requests."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    stream: "RequestStream"
    accepted: asyncio.Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class _FailAll:
    message: str


@dataclass
class StatsSnapshot:
    """What the step thread last saw; read by /metrics and /health from the event loop."""

    stats: EngineStats | None = None
    health: str | None = None
    time: float = field(default_factory=time.monotonic)


class RequestStream:
    """Outputs of one request, in order; iterate with `async for`. The last one has `finished`.

    Stopping the iteration early (client gone, task cancelled) must be followed by `abort()`;
    `AsyncEngine.generate` does that for you.
    """

    def __init__(self, engine: "AsyncEngine", request_id: str, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the step thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Stop generating (idempotent; a no-op once finished)."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_output: Callable[[RequestOutput], None] | None = None,
                 on_abort: Callable[[str], None] | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.max_model_len = engine.max_model_len
        self.on_output = on_output
        """Called in the step thread for every output (metrics hooks)."""
        self.on_abort = on_abort
        self._commands: deque = deque()
        self._cond = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._error: str | None = None
        self.snapshot = StatsSnapshot(engine.stats(), engine.health())
        self._thread = threading.Thread(target=self._run, name="afdserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ event-loop side
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Queue a request; raises ValueError (bad prompt), EngineDeadError or EngineStoppedError."""
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id, loop)
        accepted = loop.create_future()
        self._send(_Add(request_id, prompt, params, stream, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of one request; aborts it when the consumer stops early or is cancelled."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id), force=True)

    def fail_in_flight(self, message: str = "the server is shutting down") -> None:
        """End every in-flight request with EngineStoppedError(message); new requests still work."""
        self._send(_FailAll(message), force=True)

    def health(self) -> str | None:
        """Read live (the executor's health is thread-safe and never blocks), so a worker lost
        while the engine is idle turns /health non-200 at once."""
        if self._error:
            return self._error
        try:
            return self.engine.health()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def stats(self) -> EngineStats | None:
        return self.snapshot.stats

    def afd_recovery(self) -> dict:
        """Restarts and replayed steps of the disaggregated runtime (empty when colocated)."""
        return self.engine.executor.recovery_stats()

    def afd_trace_summary(self) -> dict[str, float]:
        """Per-step means of the disaggregated pipeline's stages (empty when colocated)."""
        return self.engine.executor.trace_summary()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail in-flight requests, stop the step thread, close the engine (and its workers)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        self.engine.close()

    def _send(self, command, force: bool = False) -> None:
        with self._cond:
            if self._stopping and not force:
                if isinstance(command, _Add):
                    command.accepted.set_exception(EngineStoppedError("the server is shutting down"))
                return
            self._commands.append(command)
            self._cond.notify()

    # ---------------------------------------------------------- step-thread side
    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._commands and not self._stopping and not self._has_work():
                    self._cond.wait(IDLE_REFRESH_S)      # idle: refresh the snapshot now and then
                commands = list(self._commands)
                self._commands.clear()
                stopping = self._stopping
            try:
                for cmd in commands:
                    self._apply(cmd)
                if stopping:
                    self._fail_all(EngineStoppedError("the server is shutting down"))
                    return
                if self._has_work():
                    self._step()
                self._publish()
            except Exception as exc:   # a bug here must not leave requests hanging forever
                traceback.print_exc()
                self._error = f"engine loop failed: {type(exc).__name__}: {exc}"
                self._fail_all(EngineDeadError(self._error))

    def _has_work(self) -> bool:
        return self._error is None and self.engine.has_unfinished_requests()

    def _apply(self, cmd) -> None:
        if isinstance(cmd, _FailAll):
            self._fail_all(EngineStoppedError(cmd.message))
            return
        if isinstance(cmd, _Abort):
            stream = self._streams.pop(cmd.request_id, None)
            if self.engine.abort_request(cmd.request_id) and self.on_abort:
                self.on_abort(cmd.request_id)
            if stream is not None:
                stream.put(asyncio.CancelledError("aborted"))
            return
        try:
            if self._error:
                raise EngineDeadError(self._error)
            self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params)
        except Exception as exc:   # ValueError, EngineDeadError: the caller answers 400 / 503
            cmd.stream.loop.call_soon_threadsafe(_set_exception, cmd.accepted, exc)
            return
        self._streams[cmd.request_id] = cmd.stream
        cmd.stream.loop.call_soon_threadsafe(_set_result, cmd.accepted, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            traceback.print_exc()
            self._error = f"engine step failed: {type(exc).__name__}: {exc}"
            self._fail_all(EngineDeadError(self._error))
            return
        for out in outputs:
            if self.on_output:
                try:
                    self.on_output(out)
                except Exception:   # metrics must never stop generation
                    traceback.print_exc()
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _fail_all(self, exc: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:
                pass
            stream.put(exc)
        self._streams.clear()
        self._publish()

    def _publish(self) -> None:
        try:
            self.snapshot = StatsSnapshot(self.engine.stats(), self.engine.health())
        except Exception as exc:
            self.snapshot = StatsSnapshot(self.snapshot.stats, f"{type(exc).__name__}: {exc}")


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
