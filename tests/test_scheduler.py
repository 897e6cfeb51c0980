"""Scheduler driven by a fake model: no torch, deterministic tokens, simulated KV slots."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afdserve.engine.block_manager import BlockManager
from afdserve.engine.request import FinishReason, Request, RequestStatus
from afdserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

VOCAB = 50


def next_token(context: list[int]) -> int:
    """The fake model's greedy choice: a fixed function of the whole context."""
    return (sum((i + 1) * t for i, t in enumerate(context)) * 7 + len(context)) % VOCAB


class FakeModel:
    """Writes each computed position into its KV slot, then samples from what the slots hold.

    Reading a slot checks it was written by the same request at the same position, so
    a block shared by two requests, or KV lost to preemption and not recomputed, fails.
    """

    def __init__(self, block_manager: BlockManager):
        self.bm = block_manager
        self.kv: dict[int, tuple[str, int, int]] = {}  # slot -> (request_id, position, token)

    def __call__(self, out: SchedulerOutput) -> dict[str, int]:
        for c in out.chunks:
            tokens, rid = c.request.all_token_ids, c.request.request_id
            for p in range(c.start, c.start + c.num_tokens):
                self.kv[self.bm.slot(rid, p)] = (rid, p, tokens[p])
        return {c.request.request_id: self._sample(c.request) for c in out.chunks if c.sample}

    def _sample(self, request: Request) -> int:
        context = []
        for p in range(request.num_tokens):
            rid, pos, token = self.kv[self.bm.slot(request.request_id, p)]
            assert (rid, pos) == (request.request_id, p), "KV slot holds another request's token"
            context.append(token)
        return next_token(context)


def reference(prompt, max_tokens, max_len, stop=frozenset(), min_tokens=0):
    """Outputs and finish reason of one request generated alone with unlimited resources."""
    tokens, out = list(prompt), []
    while True:
        out.append(next_token(tokens))
        tokens.append(out[-1])
        if len(out) >= min_tokens and out[-1] in stop:
            return out, FinishReason.STOP
        if len(out) >= max_tokens or len(tokens) >= max_len:
            return out, FinishReason.LENGTH


def make(num_blocks=64, block_size=4, **config):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(**config), bm), bm, FakeModel(bm)


def prompt(n, seed=0):
    return [(seed * 13 + j * 7 + 1) % VOCAB for j in range(n)]


def step(sched, model):
    out = sched.schedule()
    return out, sched.update_from_output(out, model(out))


def shape(out):
    return [(c.request.request_id, c.start, c.num_tokens, c.sample) for c in out.chunks]


def test_import_does_not_pull_torch():
    code = "import sys, afdserve.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_prefill_then_decode_to_max_tokens():
    sched, bm, model = make()
    sched.add_request(Request("a", prompt(5), max_tokens=3))
    out, done = step(sched, model)
    assert shape(out) == [("a", 0, 5, True)] and out.num_batched_tokens == 5 and not done
    out, done = step(sched, model)
    assert shape(out) == [("a", 5, 1, True)] and out.chunks[0].is_decode
    out, done = step(sched, model)
    assert shape(out) == [("a", 6, 1, True)]
    assert [r.request_id for r in done] == ["a"]
    req = done[0]
    assert (req.output_token_ids, req.finish_reason) == reference(prompt(5), 3, 4096)
    assert req.status is RequestStatus.FINISHED
    assert bm.num_free_blocks == bm.num_blocks and not sched.has_unfinished()
    assert sched.schedule().is_empty


def test_chunked_prefill_splits_prompt_by_budget():
    sched, bm, model = make(max_num_batched_tokens=4)
    sched.add_request(Request("a", prompt(10), max_tokens=2))
    sched.add_request(Request("b", prompt(3, 1), max_tokens=1))
    shapes = [shape(step(sched, model)[0]) for _ in range(4)]
    assert shapes == [
        [("a", 0, 4, False)],
        [("a", 4, 4, False)],
        [("a", 8, 2, True), ("b", 0, 2, False)],
        [("a", 10, 1, True), ("b", 2, 1, True)],  # a's decode, then b's last prefill token
    ]
    assert not sched.has_unfinished() and bm.num_free_blocks == bm.num_blocks


def test_without_chunking_a_prompt_waits_for_the_whole_budget():
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_batched_tokens=8, max_model_len=16, enable_chunked_prefill=False)
    sched, _, model = make(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    sched.add_request(Request("a", prompt(10), max_tokens=2))
    sched.add_request(Request("b", prompt(10, 1), max_tokens=2))
    assert shape(step(sched, model)[0]) == [("a", 0, 10, True)]
    assert shape(step(sched, model)[0]) == [("a", 10, 1, True), ("b", 0, 10, True)]


def test_stop_token_respects_min_tokens():
    sched, bm, _ = make()
    sched.add_request(Request("a", [1, 2], max_tokens=10, stop_token_ids=frozenset({7}), min_tokens=2))
    finished = []
    for token in (7, 3, 7, 5):
        out = sched.schedule()
        finished += sched.update_from_output(out, {"a": token})
        if finished:
            break
    req = finished[0]
    assert req.output_token_ids == [7, 3, 7] and req.finish_reason is FinishReason.STOP
    assert bm.num_free_blocks == bm.num_blocks


def test_max_model_len_truncates_output():
    sched, _, model = make(max_model_len=8)
    sched.add_request(Request("a", prompt(6), max_tokens=100))
    done = []
    while not done:
        done = step(sched, model)[1]
    assert done[0].num_output_tokens == 2 and done[0].finish_reason is FinishReason.LENGTH


def test_add_request_rejects_requests_that_can_never_run():
    sched, _, _ = make(num_blocks=2, block_size=4, max_model_len=16)
    for bad in ([], prompt(16), prompt(9)):  # empty; >= max_model_len; more than the 8-slot cache
        with pytest.raises(ValueError):
            sched.add_request(Request("x", bad, max_tokens=1))
    with pytest.raises(ValueError):
        sched.add_request(Request("x", prompt(2), max_tokens=0))
    sched.add_request(Request("x", prompt(8), max_tokens=1))
    with pytest.raises(ValueError):
        sched.add_request(Request("x", prompt(2), max_tokens=1))  # duplicate id
    assert sched.num_waiting == 1


def test_fcfs_head_blocks_smaller_later_request_and_cache_bounds_length():
    sched, bm, model = make(num_blocks=4, block_size=4)
    sched.add_request(Request("a", prompt(4), max_tokens=2))
    step(sched, model)
    sched.add_request(Request("b", prompt(16, 1), max_tokens=5))  # needs the whole cache
    sched.add_request(Request("c", prompt(2, 2), max_tokens=1))  # would fit, must not overtake b
    out, done = step(sched, model)
    assert shape(out) == [("a", 4, 1, True)] and [r.request_id for r in done] == ["a"]
    out, done = step(sched, model)
    assert shape(out) == [("b", 0, 16, True)]
    # 17 tokens cannot be continued in a 16-slot cache: b ends by length after one token.
    assert [(r.request_id, r.num_output_tokens, r.finish_reason) for r in done] == [("b", 1, FinishReason.LENGTH)]
    out, done = step(sched, model)
    assert shape(out) == [("c", 0, 2, True)] and bm.num_free_blocks == 4


def test_max_num_seqs_admits_in_arrival_order():
    sched, _, model = make(max_num_seqs=2)
    for i, rid in enumerate("abcd"):
        sched.add_request(Request(rid, prompt(3, i), max_tokens=2))
    out, _ = step(sched, model)
    assert [c.request.request_id for c in out.chunks] == ["a", "b"] and sched.num_waiting == 2
    out, done = step(sched, model)
    assert [r.request_id for r in done] == ["a", "b"]
    out, _ = step(sched, model)
    assert [c.request.request_id for c in out.chunks] == ["c", "d"]


def test_abort_waiting_and_running_frees_blocks():
    sched, bm, model = make(max_num_seqs=1)
    sched.add_request(Request("a", prompt(9), max_tokens=5))
    sched.add_request(Request("b", prompt(3), max_tokens=5))
    step(sched, model)
    assert bm.num_free_blocks == bm.num_blocks - 3 and sched.num_waiting == 1
    b = sched.abort_request("b")
    assert b.is_finished and b.finish_reason is FinishReason.ABORT and sched.num_waiting == 0
    a = sched.abort_request("a")
    assert a.finish_reason is FinishReason.ABORT and sched.num_running == 0
    assert bm.num_free_blocks == bm.num_blocks and bm.block_table("a") == []
    assert sched.abort_request("a") is None and sched.abort_request("zz") is None
    assert not sched.has_unfinished() and sched.schedule().is_empty


def test_abort_between_schedule_and_update_skips_the_chunk():
    sched, bm, model = make()
    sched.add_request(Request("a", prompt(4), max_tokens=5))
    sched.add_request(Request("b", prompt(4, 1), max_tokens=1))
    out = sched.schedule()
    sampled = model(out)
    sched.abort_request("a")
    done = sched.update_from_output(out, sampled)
    assert [r.request_id for r in done] == ["b"]
    a = next(c.request for c in out.chunks if c.request.request_id == "a")
    assert a.output_token_ids == [] and a.finish_reason is FinishReason.ABORT
    assert bm.num_free_blocks == bm.num_blocks


def test_finish_request_with_engine_reason():
    sched, bm, model = make()
    sched.add_request(Request("a", prompt(4), max_tokens=5))
    step(sched, model)
    req = sched.finish_request("a", FinishReason.STOP)  # e.g. a stop string found by the detokenizer
    assert req.finish_reason is FinishReason.STOP and sched.get_request("a") is None
    assert bm.num_free_blocks == bm.num_blocks


def test_preemption_recomputes_and_completes_with_same_outputs():
    sched, bm, model = make(num_blocks=4, block_size=2)  # 8 slots; each request grows to 7 tokens
    prompts = {rid: prompt(2, i) for i, rid in enumerate("abc")}
    for rid, p in prompts.items():
        sched.add_request(Request(rid, p, max_tokens=5))
    requests = {rid: sched.get_request(rid) for rid in prompts}
    all_preempted, finished = [], []
    for _ in range(100):
        if not sched.has_unfinished():
            break
        out, done = step(sched, model)
        assert not set(out.preempted) & {c.request.request_id for c in out.chunks}
        all_preempted += out.preempted
        finished += done
    assert all_preempted and requests[all_preempted[0]].num_preemptions > 0
    assert all_preempted[0] == "c"  # the most recently admitted goes first
    for rid, p in prompts.items():
        assert (requests[rid].output_token_ids, requests[rid].finish_reason) == reference(p, 5, 4096)
    assert len(finished) == 3 and bm.num_free_blocks == 4


def test_preempted_request_keeps_its_place_and_waits_a_step():
    sched, bm, model = make(num_blocks=3, block_size=1, max_num_batched_tokens=2)
    sched.add_request(Request("a", prompt(1), max_tokens=4))
    sched.add_request(Request("b", prompt(1, 1), max_tokens=4))
    assert shape(step(sched, model)[0]) == [("a", 0, 1, True), ("b", 0, 1, True)]
    sched.add_request(Request("c", prompt(1, 2), max_tokens=1))
    out, _ = step(sched, model)
    # b is short of a block and is the newest, so it preempts itself; the freed block and
    # the leftover budget would fit a 1-token chunk of b, but not in the step that preempted it.
    assert shape(out) == [("a", 1, 1, True)] and out.preempted == ("b",)
    assert sched.get_request("b").num_preemptions == 1 and bm.block_table("b") == []
    rest = [shape(step(sched, model)[0]) for _ in range(4)]
    # b re-enters the queue ahead of the later arrival c, recomputing prompt + output.
    assert rest == [[("a", 2, 1, True)], [("b", 0, 2, True)], [("b", 2, 1, True)], [("c", 0, 1, True)]]
    assert not sched.has_unfinished() and bm.num_free_blocks == 3


# -- property test -------------------------------------------------------------


@st.composite
def scenarios(draw):
    block_size = draw(st.integers(1, 4))
    num_blocks = draw(st.integers(2, 12))
    chunked = draw(st.booleans())
    max_model_len = draw(st.integers(4, 32))
    budget = draw(st.integers(1, 24) if chunked else st.integers(max_model_len, 48))
    config = SchedulerConfig(draw(st.integers(1, 5)), budget, max_model_len, chunked)
    max_prompt = min(max_model_len - 1, num_blocks * block_size)
    request = st.fixed_dictionaries(
        {
            "arrival": st.integers(0, 12),
            "prompt_len": st.integers(1, max_prompt),
            "max_tokens": st.integers(1, 12),
            "min_tokens": st.integers(0, 3),
            "stop": st.frozensets(st.integers(0, VOCAB - 1), max_size=4),
            "abort": st.one_of(st.none(), st.tuples(st.integers(0, 30), st.booleans())),
        }
    )
    return num_blocks, block_size, config, draw(st.lists(request, min_size=1, max_size=8))


def check_step(sched, bm, out, requests):
    cfg = sched.config
    assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks) <= cfg.max_num_batched_tokens
    assert sched.num_running <= cfg.max_num_seqs
    ids = [c.request.request_id for c in out.chunks]
    assert len(ids) == len(set(ids)) and not set(ids) & set(out.preempted)
    kinds = [c.is_decode for c in out.chunks]
    assert kinds == sorted(kinds, reverse=True), "decodes must come before prefills"
    for c in out.chunks:
        assert c.num_tokens >= 1 and c.start == c.request.num_computed_tokens
        assert c.sample == (c.start + c.num_tokens == c.request.num_tokens)
        assert len(bm.block_table(c.request.request_id)) * bm.block_size >= c.start + c.num_tokens
        assert cfg.enable_chunked_prefill or c.sample
    check_blocks(bm, requests)


def check_blocks(bm, requests):
    owned = []
    for r in requests:
        table = bm.block_table(r.request_id)
        if r.status is not RequestStatus.RUNNING:
            assert table == [], f"{r.request_id} ({r.status}) holds blocks"
        owned += table
    assert len(owned) == len(set(owned)), "a block is owned by two requests"
    assert len(owned) + bm.num_free_blocks == bm.num_blocks


@settings(max_examples=80, deadline=None)
@given(scenarios())
def test_random_workloads_finish_without_leaks(scenario):
    num_blocks, block_size, config, specs = scenario
    bm = BlockManager(num_blocks, block_size)
    sched, model = Scheduler(config, bm), FakeModel(bm)
    requests = [
        Request(f"r{i}", prompt(s["prompt_len"], i), s["max_tokens"], s["stop"], s["min_tokens"])
        for i, s in enumerate(specs)
    ]
    aborts = {s["abort"][0]: [] for s in specs if s["abort"]}
    for r, s in zip(requests, specs):
        if s["abort"]:
            aborts[s["abort"][0]].append((r.request_id, s["abort"][1]))
    last_event = max([s["arrival"] for s in specs] + list(aborts))
    for t in range(2000):  # (c) every request finishes within a bounded number of steps
        for r, s in zip(requests, specs):
            if s["arrival"] == t:
                sched.add_request(r)
        for rid, mid_step in aborts.get(t, ()):
            if not mid_step:
                sched.abort_request(rid)
        if t > last_event and not sched.has_unfinished():
            break
        out = sched.schedule()
        check_step(sched, bm, out, requests)  # (a), (d)
        sampled = model(out)
        for rid, mid_step in aborts.get(t, ()):
            if mid_step:
                sched.abort_request(rid)
        sched.update_from_output(out, sampled)
        check_blocks(bm, requests)
    else:
        pytest.fail("requests still unfinished after 2000 steps")
    assert bm.num_free_blocks == num_blocks  # (b)
    max_len = min(config.max_model_len, num_blocks * block_size + 1)
    for r, s in zip(requests, specs):
        assert r.is_finished
        want, reason = reference(r.prompt_token_ids, r.max_tokens, max_len, r.stop_token_ids, r.min_tokens)
        if r.finish_reason is FinishReason.ABORT:
            assert want[: r.num_output_tokens] == r.output_token_ids
        else:
            assert (r.output_token_ids, r.finish_reason) == (want, reason)


@pytest.mark.parametrize("start,stop", [(0, 3), (1, 5), (3, 4), (4, 6), (0, 6), (2, 2)])
def test_token_ids_slices_like_all_token_ids(start, stop):
    r = Request("r", [10, 11, 12, 13], 8)
    r.output_token_ids += [20, 21]
    assert r.token_ids(start, stop) == r.all_token_ids[start:stop]


class _CharTokenizer:
    """Token id i is the character chr(i)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


@pytest.mark.parametrize("stop_tokens,max_tokens", [(frozenset(), 3), (frozenset({ord("c")}), 8)])
def test_stop_string_is_decided_once_with_token_and_length_stops(stop_tokens, max_tokens):
    """The token completing stop string "bc" also ends the budget or is a stop token: the request
    finishes once, for the stop string, and its blocks are freed."""
    from afdserve.engine.detokenizer import IncrementalDetokenizer

    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_model_len=32), bm)
    req = Request("r", [1, 2], max_tokens, stop_token_ids=stop_tokens)
    req.detokenizer = IncrementalDetokenizer(_CharTokenizer(), ["bc"])
    sched.add_request(req)
    finished = []
    for token in "abc":
        finished += sched.update_from_output(sched.schedule(), {"r": ord(token)})
    assert finished == [req] and req.finish_reason is FinishReason.STOP and req.stop_reason == "bc"
    assert req.detokenizer.output_text(finished=True) == "a"
    assert not sched.has_unfinished() and bm.num_free_blocks == 4
