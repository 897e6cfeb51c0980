"""Decode graphs (afdserve/engine/graphs.py): replayed steps equal normal ones, unsafe captures are refused."""
import dataclasses

import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.engine import graphs as graphs_mod
from afdserve.engine.graphs import DecodeGraphs, _replay_op, graphs_mode
from afdserve.model import fp8 as fp8_mod
from afdserve.model import kernels

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [3], list(range(20, 45))]
# different lengths: sequences finish at different steps, so the batch shrinks 4 -> 3 -> 2 -> 1
PARAMS = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (8, 14, 20, 26)]


@pytest.fixture
def record_at_once(monkeypatch):
    """Unit tests of one batch size: record on its first decode step."""
    monkeypatch.setattr(graphs_mod, "CAPTURE_AFTER", 1)


def _generate(ckpt, dtype, monkeypatch, mode, **kwargs):
    monkeypatch.setenv(graphs_mod.GRAPHS_ENV, mode)
    with LLM(model=str(ckpt), dtype=dtype, num_kv_blocks=64, block_size=4, **kwargs) as llm:
        outs = llm.generate(PROMPTS, PARAMS)
        return [o.outputs[0].token_ids for o in outs], llm.engine.executor.runner.graphs


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_graphs_give_the_tokens_of_normal_steps(tiny_ckpt, monkeypatch, dtype):
    plain, off = _generate(tiny_ckpt, dtype, monkeypatch, "off")
    graphed, g = _generate(tiny_ckpt, dtype, monkeypatch, "on")
    checked, gc = _generate(tiny_ckpt, dtype, monkeypatch, "check")   # every replay checked bitwise
    assert graphed == plain == checked
    assert off.replays == 0 and not off.graphs
    assert not gc.refused and not g.refused or set(g.refused) == set(gc.refused)
    if dtype == "bfloat16" and kernels.current_policy().native_rows:
        # the native bf16 MoE reads its routing from tensors: every batch size was captured and replayed
        assert set(g.graphs) == {1, 2, 3, 4} and g.replays > 0 and not g.refused


@pytest.mark.skipif(not fp8_mod.NATIVE_BF16, reason="the native MoE over FP8 experts needs AVX512-BF16")
def test_fp8_weights_and_an_fp8_kv_cache_replay_too(tmp_path, monkeypatch):
    """FP8 experts run the native MoE (routing stays in tensors), so their steps are graphs; with an
    fp8 KV cache as well, replays give the tokens of normal steps."""
    from afdserve.config import get_preset
    from afdserve.model.checkpoint import init_checkpoint
    cfg = dataclasses.replace(get_preset("tiny"), hidden_size=128, moe_intermediate_size=128, share_expert_dim=128)
    ckpt = init_checkpoint(cfg, tmp_path / "m", seed=1)
    extra = {"quantization": "fp8", "kv_cache_dtype": "fp8"}
    plain, _ = _generate(ckpt, "bfloat16", monkeypatch, "off", **extra)
    checked, g = _generate(ckpt, "bfloat16", monkeypatch, "check", **extra)
    assert checked == plain and g.replays == 0 and not g.refused and set(g.graphs) == {1, 2, 3, 4}
    graphed, g = _generate(ckpt, "bfloat16", monkeypatch, "on", **extra)
    assert graphed == plain and g.replays > 0 and not g.refused


def test_a_forward_that_reads_data_into_python_is_not_captured(record_at_once):
    calls = []

    def forward(ids, meta):
        calls.append(1)
        n = int(ids.sum().tolist())               # data-dependent control flow
        return torch.full((1, 4), float(n))

    g = DecodeGraphs(forward, "on")
    meta = _Meta()
    for v in (3, 4, 5):
        assert _step(g, forward, torch.tensor([v]), meta).tolist() == [[float(v)] * 4]
    assert len(calls) == 4        # step 1: the refused capture, then the normal forward; no capture after
    assert 1 in g.refused and "tolist" in g.refused[1] and not g.graphs


def test_a_replay_that_differs_from_the_normal_forward_is_dropped(record_at_once):
    state = {"step": 0}

    def forward(ids, meta):                        # depends on Python state a replay cannot see
        state["step"] += 1
        return ids.float() * 0 + state["step"]

    g = DecodeGraphs(forward, "on")
    meta = _Meta()
    outs = [_step(g, forward, torch.tensor([1.0]), meta).item() for _ in range(4)]
    assert outs == [1.0, 2.0, 3.0, 4.0]            # always the normal forward's result
    assert 1 in g.refused and "differed" in g.refused[1] and not g.graphs


def test_replays_follow_new_inputs(record_at_once):
    def forward(ids, meta):
        return (ids.float() * 2 + meta.positions.float()).unsqueeze(0)

    g = DecodeGraphs(forward, "on")
    for step, v in enumerate([1, 2, 3, 4, 5]):
        meta = _Meta(position=10 + step)
        assert g.run(torch.tensor([v]), meta).tolist() == [[2.0 * v + 10 + step]]
    assert g.graphs[1].validated and g.replays == 3


def test_replay_ops():
    a, b = torch.ones(3), torch.arange(3.0)
    out = torch.add(a, b)
    op = _replay_op(torch.ops.aten.add.Tensor, (a, b), {}, out)
    b += 1
    op()
    assert out.tolist() == [2.0, 3.0, 4.0]                                  # recomputed in place
    assert _replay_op(torch.ops.aten.view.default, (a, [3]), {}, a.view(3)) is None   # a view: free
    dst = torch.zeros(3)
    op = _replay_op(torch.ops.aten.copy_.default, (dst, b), {}, dst)       # in place: called again
    b += 1
    op()
    assert dst.tolist() == b.tolist()
    with pytest.raises(graphs_mod.CaptureRefused):
        _replay_op(torch.ops.aten.nonzero.default, (b,), {}, b.nonzero())


def test_graphs_mode_env(monkeypatch):
    for raw, mode in (("0", "off"), ("on", "on"), ("check", "check"), ("", "on")):
        monkeypatch.setenv(graphs_mod.GRAPHS_ENV, raw)
        assert graphs_mode() == mode
    monkeypatch.setenv(graphs_mod.GRAPHS_ENV, "sometimes")
    with pytest.raises(ValueError, match="AFDSERVE_DECODE_GRAPHS"):
        graphs_mode()


def _step(g, forward, ids, meta):
    """What ModelRunner does: the graph's logits, else (None) the normal forward's."""
    out = g.run(ids, meta)
    return forward(ids, meta) if out is None else out


class _Meta:
    """The metadata fields a graph reads (one sequence)."""

    def __init__(self, position: int = 0):
        self.query_lens = [1]
        self.positions = torch.tensor([position])
        self.slot_mapping = torch.tensor([position])

    def select(self, seqs):
        return self


def test_engine_args_and_cli_flag_turn_graphs_off(tiny_ckpt, monkeypatch):
    import argparse

    from afdserve.commands import add_kernels_argument, apply_kernels_argument
    monkeypatch.delenv(graphs_mod.GRAPHS_ENV, raising=False)
    with LLM(model=str(tiny_ckpt), dtype="bfloat16", num_kv_blocks=16, block_size=4, decode_graphs=False) as llm:
        llm.generate([[5, 6]], PARAMS[0])
        assert llm.engine.executor.runner.graphs.mode == "off" and not llm.engine.executor.runner.graphs.graphs
    p = argparse.ArgumentParser()
    add_kernels_argument(p)
    monkeypatch.setenv(graphs_mod.GRAPHS_ENV, "on")             # restored after the test
    apply_kernels_argument(p.parse_args(["--decode-graphs", "off"]))
    assert graphs_mode() == "off"
    with pytest.raises(SystemExit):
        p.parse_args(["--decode-graphs", "maybe"])


def test_a_failing_capture_or_replay_falls_back_to_the_normal_step(monkeypatch, record_at_once):
    """An error inside the recording or a replay (none is expected) costs the batch size its graph,
    never the step: the step's logits come from the normal forward."""
    def forward(ids, meta):
        return (ids.float() * 3).unsqueeze(0)

    g = DecodeGraphs(forward, "on")
    monkeypatch.setattr(graphs_mod, "_replay_op", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    assert _step(g, forward, torch.tensor([2]), _Meta()).tolist() == [[6.0]]
    assert "recording it failed (RuntimeError: boom)" in g.refused[1] and not g.graphs
    monkeypatch.setattr(graphs_mod, "_replay_op", _replay_op)
    g = DecodeGraphs(forward, "on")
    for v in (1, 2):                                      # captured, then validated
        _step(g, forward, torch.tensor([v]), _Meta())
    g.graphs[1].ops.insert(0, lambda: (_ for _ in ()).throw(RuntimeError("stale")))
    assert _step(g, forward, torch.tensor([5]), _Meta()).tolist() == [[15.0]]
    assert "replay failed (RuntimeError: stale)" in g.refused[1] and not g.graphs


def test_a_bad_step_keeps_its_own_error_and_the_batch_size_its_chance(record_at_once):
    table = torch.ones(4, 2)

    def forward(ids, meta):
        return torch.nn.functional.embedding(ids, table)        # ids >= 4: torch's own error

    g = DecodeGraphs(forward, "on")
    with pytest.raises(IndexError, match="out of range"):
        g.run(torch.tensor([7]), _Meta())
    assert not g.refused and not g.graphs
    assert g.run(torch.tensor([3]), _Meta()).tolist() == [[1.0, 1.0]] and 1 in g.graphs


def test_a_batch_size_is_recorded_on_its_third_decode_step():
    """Recording + checking cost a few steps: a batch size continuous batching only passes through
    is never recorded."""
    calls = []

    def forward(ids, meta):
        calls.append(1)
        return ids.float().unsqueeze(0)

    g = DecodeGraphs(forward, "on")
    assert graphs_mod.CAPTURE_AFTER == 3
    for step in range(2):
        assert g.run(torch.tensor([step]), _Meta()) is None and not g.graphs
    assert g.run(torch.tensor([7]), _Meta()).tolist() == [[7.0]] and 1 in g.graphs


@pytest.mark.skipif(not kernels.NATIVE, reason="afdserve._native is not built on this machine")
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_the_live_attention_of_a_replay_calls_the_kernel_directly(cache_dtype, monkeypatch):
    """paged_decode_runner, set up on one step's tensors, gives paged_attention's output for a
    later step's metadata (3 sequences whose block tables are a column slice: strided rows), falls
    back (False) when the policy no longer runs the native kernel, and is None for a prefill step."""
    from afdserve.model.attention import AttentionMetadata, paged_attention, paged_decode_runner
    monkeypatch.setattr(kernels, "_policy", kernels.decide_policy("auto", threads=2))
    qdtype = torch.float32 if cache_dtype is torch.float32 else torch.bfloat16
    g = torch.Generator().manual_seed(7)
    k = torch.randn(40 * 4, 1, 16, generator=g).to(cache_dtype)
    v = torch.randn(40 * 4, 1, 16, generator=g).to(cache_dtype)
    q = torch.randn(3, 8, 16, generator=g).to(qdtype)
    tables = [[3, 9, 1], [4, 20], [7, 8, 30, 31, 2]]

    def meta(ctx):
        return AttentionMetadata.build([c - 1 for c in ctx], [0, 0, 0], [1, 1, 1], ctx, tables, 4)
    first, later = meta([9, 6, 17]), meta([10, 7, 11]).select(slice(0, 3))
    later = dataclasses.replace(later, block_tables=later.block_tables[:, :3])     # rows strided by 5
    assert not later.block_tables.is_contiguous()
    with torch.inference_mode():
        out = paged_attention(q, k, v, first, 0.25, (0.5, 2.0))
        run = paged_decode_runner(q, k, v, first, 0.25, (0.5, 2.0), out=out)
        assert run is not None and run(later)
        assert torch.equal(out, paged_attention(q, k, v, later, 0.25, (0.5, 2.0)))
        monkeypatch.setattr(kernels, "_policy", kernels.decide_policy("torch"))
        assert run(later) is False
        prefill = AttentionMetadata.build([0, 1], [0, 1], [2], [2], [[3]], 4)
        assert paged_decode_runner(q[:2], k, v, prefill, 0.25, out=out[:2]) is None
