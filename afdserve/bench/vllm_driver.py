"""Serve timing requests against vLLM's CPU build; runs with the interpreter of vLLM's own venv.

    <vllm venv>/bin/python vllm_driver.py JOB.json

This file is executed by a separate virtual environment that holds vLLM (see
`afdserve.bench.vllm_peer`, which starts it); it imports nothing from afdserve and only the
standard library before vLLM. Thread binding and KV-cache size come from the environment the
caller sets (VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU, VLLM_CPU_KVCACHE_SPACE).

JOB.json: {"model": DIR, "dtype": "bfloat16", "seed": 0, "max_model_len": N, "max_num_seqs": N,
"max_num_batched_tokens": 2048, "enforce_eager": false}.

Protocol: one JSON object per line. The driver loads the model and answers
{"ok": true, "ready": true, "vllm": ..., "torch": ..., "load_s": ...} (or {"ok": false, "error":
"<one line>"} and exits 1); then it reads requests from stdin and answers each on the protocol
stream (the process's original stdout; everything vLLM prints goes to stderr):
  {"op": "point", "batch": B, "context": C, "steps": N, "warmup": W}  -> decode/prefill timing
  {"op": "greedy", "prompts": [[ids], ...], "max_tokens": K}          -> {"tokens": [[ids], ...]}
  {"op": "quit"}
A failing request answers {"ok": false, "error": "<one line>"} and the driver goes on.

Timing of a point: B requests of C random prompt tokens are added to the engine (greedy,
ignore_eos) and `LLMEngine.step()` is called until done. A step is a *full decode step* when
every request already had a token and gained exactly one; after W such steps, the wall times of
the next N are kept and their median is the decode time per step (afdserve's bench reports the
median of `engine.step()` wall times over full decode steps: the same statistic). Prefill time:
from adding the requests to the end of the step after which every request has its first token.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
import traceback

METHOD = ("median wall time of LLMEngine.step() over full decode steps (every request gains one "
          "token), after warm-up steps; prefill = until every request has its first token")


def load_job(path: str) -> dict:
    with open(path) as f:
        job = json.load(f)
    missing = [k for k in ("model", "dtype", "max_model_len", "max_num_seqs") if k not in job]
    if missing:
        raise ValueError(f"job file {path}: missing {', '.join(missing)}")
    job.setdefault("seed", 0)
    job.setdefault("max_num_batched_tokens", 2048)
    job.setdefault("enforce_eager", False)
    return job


def step_budget(job: dict) -> int:
    """Tokens per engine step: the job's budget, at least one whole prompt."""
    return max(int(job["max_num_batched_tokens"]), int(job["max_model_len"]))


def build_llm(job: dict):
    from vllm import LLM
    return LLM(model=job["model"], dtype=job["dtype"], seed=int(job["seed"]), skip_tokenizer_init=True,
               max_model_len=int(job["max_model_len"]), max_num_seqs=int(job["max_num_seqs"]),
               max_num_batched_tokens=step_budget(job), enable_prefix_caching=False,
               enforce_eager=bool(job["enforce_eager"]))


def full_decode(before: dict, after: dict) -> bool:
    """Every request already had a token and gained exactly one in this step."""
    return all(before[r] >= 1 and after[r] == before[r] + 1 for r in before)


def _params(max_tokens: int):
    from vllm import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def _prompt(ids):
    from vllm.inputs import TokensPrompt
    return TokensPrompt(prompt_token_ids=[int(t) for t in ids])


def measure_point(llm, batch: int, context: int, steps: int, warmup: int, seed: int = 0,
                  max_len: int | None = None) -> dict:
    engine = llm.llm_engine
    vocab = engine.model_config.get_vocab_size()
    rng = random.Random(seed * 1000003 + batch * 7919 + context)
    ids = [f"p{batch}x{context}-{time.monotonic_ns()}-{i}" for i in range(batch)]
    counts = {r: 0 for r in ids}
    # early requests decode while later ones still prefill (chunked prefill): every request must
    # still be running when the last prefill ends, so each may generate all the job's max_model_len
    # leaves (vllm_peer.driver_job sizes it for that; requests are aborted once the steps are timed)
    room = (max_len or engine.model_config.max_model_len) - context
    if room < warmup + steps + 1:
        raise ValueError(f"batch {batch} context {context}: max_model_len leaves {room} tokens, "
                         f"fewer than warm-up + steps + 1 = {warmup + steps + 1}")
    params = _params(room)
    t0 = time.perf_counter()
    for r in ids:
        engine.add_request(r, _prompt(rng.randrange(2, vocab) for _ in range(context)), params)
    prefill_s, times, seen = None, [], 0
    try:
        while engine.has_unfinished_requests() and len(times) < steps:
            t = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t
            before = dict(counts)
            for o in outs:
                if o.request_id in counts:
                    counts[o.request_id] = len(o.outputs[0].token_ids)
            if prefill_s is None:
                if all(v >= 1 for v in counts.values()):
                    prefill_s = time.perf_counter() - t0
            elif full_decode(before, counts):
                seen += 1
                if seen > warmup:
                    times.append(dt)
    finally:
        engine.abort_request(ids)
        while engine.has_unfinished_requests():
            engine.step()
    if not times:
        raise RuntimeError(f"batch {batch} context {context}: no full decode step was timed")
    step_s = statistics.median(times)
    return {"batch": batch, "context": context, "steps_timed": len(times), "step_s": step_s,
            "step_s_min": min(times), "step_s_mean": statistics.mean(times), "tpot_ms": step_s * 1e3,
            "tokens_per_s": batch / step_s, "prefill_s": prefill_s,
            "prefill_tokens_per_s": batch * context / prefill_s if prefill_s else None, "method": METHOD}


def greedy_tokens(llm, prompts: list, max_tokens: int) -> list[list[int]]:
    outs = llm.generate([_prompt(p) for p in prompts], _params(max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def handle(llm, req: dict, seed: int, max_len: int | None = None) -> dict | None:
    op = req.get("op")
    if op == "quit":
        return None
    if op == "point":
        return {"ok": True, **measure_point(llm, int(req["batch"]), int(req["context"]), int(req.get("steps", 16)),
                                            int(req.get("warmup", 2)), seed, max_len)}
    if op == "greedy":
        return {"ok": True, "tokens": greedy_tokens(llm, req["prompts"], int(req.get("max_tokens", 16)))}
    raise ValueError(f"unknown op {op!r}")


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


def protocol_stream():
    """The original stdout, kept for answers; fd 1 (inherited by vLLM's processes) becomes stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: vllm_driver.py JOB.json", file=sys.stderr)
        return 2
    reply = protocol_stream()

    def send(obj: dict) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    try:
        job = load_job(argv[0])
        import torch
        import vllm
        t = time.perf_counter()
        llm = build_llm(job)
        send({"ok": True, "ready": True, "vllm": vllm.__version__, "torch": torch.__version__,
              "load_s": time.perf_counter() - t, "dtype": job["dtype"]})
    except BaseException as exc:
        traceback.print_exc(file=sys.stderr)
        send({"ok": False, "error": one_line(exc)})
        return 1
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = handle(llm, json.loads(line), int(job["seed"]), int(job["max_model_len"]))
        except Exception as exc:  # one failing request does not end the session
            traceback.print_exc(file=sys.stderr)
            answer = {"ok": False, "error": one_line(exc)}
        if answer is None:
            break
        send(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
