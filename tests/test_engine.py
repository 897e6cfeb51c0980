"""The engine end to end on a tiny random model: cached decoding, batching, preemption, sampling."""
import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.engine.engine import EngineArgs, LLMEngine
from afdserve.model.attention import AttentionMetadata, KVCache
from afdserve.model.checkpoint import load_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [3], list(range(20, 45)), [100, 200, 300, 400]]


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    with LLM(model=str(tiny_ckpt), dtype="float32", num_kv_blocks=256, block_size=4) as llm:
        yield llm


def _full_logits(model, ids):
    n = len(ids)
    kv = KVCache(model.config.num_hidden_layers, -(-n // 4), 4, 1, model.config.head_dim, torch.float32)
    meta = AttentionMetadata.build(list(range(n)), list(range(n)), [n], [n], [list(range(-(-n // 4)))], 4)
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids), meta, kv))


def test_incremental_decoding_equals_full_recompute(tiny_ckpt):
    model = load_model(tiny_ckpt)
    ids = [5, 17, 33, 2, 99, 250, 7, 8, 9, 10]
    full = _full_logits(model, ids)
    kv = KVCache(model.config.num_hidden_layers, 4, 4, 1, model.config.head_dim, torch.float32)
    table = [2, 0, 3]   # non-contiguous blocks
    with torch.inference_mode():
        for p, t in enumerate(ids):
            slot = table[p // 4] * 4 + p % 4
            meta = AttentionMetadata.build([p], [slot], [1], [p + 1], [table[: p // 4 + 1]], 4)
            step = model.logits(model(torch.tensor([t]), meta, kv))
            torch.testing.assert_close(step[0], full[p], rtol=1e-4, atol=1e-4)


def test_generate_returns_token_ids_and_lengths(llm):
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    for o in outs:
        assert len(o.outputs[0].token_ids) == 12 and o.outputs[0].finish_reason == "length"
        assert o.finished and o.metrics.first_token_time is not None


def test_batched_greedy_equals_one_at_a_time(llm):
    batched = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    assert batched == alone


def test_greedy_equals_argmax_of_full_recompute(llm, tiny_ckpt):
    model = load_model(tiny_ckpt)
    prompt = [11, 22, 33, 44]
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0].token_ids
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(_full_logits(model, ids)[-1].argmax()))
    assert got == ids[len(prompt):]


def test_preemption_and_chunked_prefill_give_the_same_tokens(tiny_ckpt, llm):
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    # 12 blocks of 4 slots cannot hold all five requests: the scheduler must preempt and recompute;
    # a budget of 8 tokens per step splits the long prompt into chunks.
    with LLM(model=str(tiny_ckpt), dtype="float32", num_kv_blocks=12, block_size=4, max_num_batched_tokens=8) as small:
        outs = small.generate(PROMPTS, GREEDY)
        assert sum(s.block_manager.num_free_blocks for s in small.engine.schedulers) == 12
    assert [o.outputs[0].token_ids for o in outs] == want


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], p)[0].outputs[0].token_ids
    batched = llm.generate([[9, 9], [5, 6, 7], [1, 2, 3, 4]], p)[1].outputs[0].token_ids
    assert alone == batched
    other = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.9, seed=99, max_tokens=10, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone


def test_n_completions_and_logprobs(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=5, logprobs=3,
                                                   ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == 5
        for tok, s in zip(c.token_ids, c.logprobs):
            assert s.token_id == tok and s.logprob <= 0 and len(s.top_logprobs) == 3
            assert s.top_logprobs[0][1] >= s.logprob


def test_stop_token_ids_and_eos(llm):
    first = llm.generate([[5, 6, 7]], GREEDY)[0].outputs[0].token_ids
    stop = first[3]
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]))[0]
    c = out.outputs[0]
    assert c.token_ids == first[: first.index(stop) + 1] and c.finish_reason == "stop" and c.stop_reason == stop


def _greedy_reference(model, prompt, n, frequency=0.0, presence=0.0):
    """Greedy decoding by full recompute, with the OpenAI penalties applied by hand: each logit is
    lowered by frequency x (times the token was generated) + presence x (generated at all)."""
    ids, out = list(prompt), []
    for _ in range(n):
        logits = _full_logits(model, ids)[-1].clone()
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_penalties_follow_their_definition(llm, tiny_ckpt):
    model = load_model(tiny_ckpt)
    prompt = [5, 6, 7]
    plain = _greedy_reference(model, prompt, 12)
    for freq, pres in ((2.0, 0.0), (0.0, 2.0), (0.7, 1.3)):
        want = _greedy_reference(model, prompt, 12, freq, pres)
        assert want != plain                                  # the penalty matters on this prompt
        got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                    frequency_penalty=freq, presence_penalty=pres))[0]
        assert got.outputs[0].token_ids == want, (freq, pres)


def test_bad_inputs_are_clear_errors(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 99999]], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["hello"], GREEDY)
    with pytest.raises(ValueError, match="context"):
        llm.generate([[5] * 5000], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    # the engine keeps working afterwards, with nothing left behind
    assert llm.generate([[5, 6, 7]], GREEDY)[0].finished
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks(tiny_ckpt):
    engine = LLMEngine(EngineArgs(model=str(tiny_ckpt), num_kv_blocks=32, block_size=4))
    engine.add_request("a", [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", [7, 8], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats().num_free_kv_blocks < 32
    assert engine.abort_request("a") and engine.abort_request("b")
    assert not engine.abort_request("a")
    s = engine.stats()
    assert s.num_free_kv_blocks == 32 and s.num_running == 0 and not engine.has_unfinished_requests()


def test_bfloat16_generation_tracks_fp32(tiny_ckpt):
    """The engine's bf16 path against fp32, with a tolerance from bf16's format. bf16 keeps 8
    significant bits, so one rounding errs by at most u = 2^-8 relative (half an ulp). To first
    order, n roundings in sequence err by at most n x u relative, and RMS norms keep every
    stage at the scale of its input, so the logits err by at most n x u x their scale (std). The
    deepest path of a layer rounds 16 times (input norm, q_proj, inter_norm, wq, scores, softmax,
    P @ V, o_proj, residual; post norm, gate/up, activation x up, down, residual, and the two
    weights read on the way), plus the final norm and the LM head: n = 16 x layers + 2.
    Teacher-forced on the tokens the engine produced: the bf16 logits are within that bound of
    fp32's, each logprob the engine reports is within 2 x bound of fp32's log-softmax (a shift of
    at most `bound` in every logit moves the log-sum-exp by at most `bound`), and each greedy
    token is within 2 x bound of fp32's best logit at its position."""
    model, model_bf = load_model(tiny_ckpt), load_model(tiny_ckpt, dtype="bfloat16")
    prompt, steps = [11, 22, 33, 44], 8
    with LLM(model=str(tiny_ckpt), dtype="bfloat16", num_kv_blocks=64, block_size=4) as bf:
        got = bf.generate([prompt], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True,
                                                   logprobs=0))[0].outputs[0]
    assert len(got.token_ids) == steps
    full32 = _full_logits(model, prompt + got.token_ids)
    full16 = _bf16_logits(model_bf, prompt + got.token_ids).float()
    bound = (16 * model.config.num_hidden_layers + 2) * 2.0 ** -8 * full32.std().item()
    assert (full16 - full32).abs().max().item() <= bound
    logp32 = torch.log_softmax(full32, -1)
    for i, (tok, lp) in enumerate(zip(got.token_ids, got.logprobs)):
        pos = len(prompt) - 1 + i
        assert lp.token_id == tok and abs(lp.logprob - logp32[pos, tok].item()) <= 2 * bound, i
        assert full32[pos, tok].item() >= full32[pos].max().item() - 2 * bound, i


def _bf16_logits(model, ids):
    n = len(ids)
    kv = KVCache(model.config.num_hidden_layers, -(-n // 4), 4, 1, model.config.head_dim, torch.bfloat16)
    meta = AttentionMetadata.build(list(range(n)), list(range(n)), [n], [n], [list(range(-(-n // 4)))], 4)
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids), meta, kv))


def _protocol_members(proto) -> set[str]:
    """Attributes, methods and properties a typing.Protocol declares."""
    return set(proto.__annotations__) | {n for n, v in vars(proto).items()
                                         if not n.startswith("_") and (callable(v) or isinstance(v, property))}


def test_executors_and_connector_implement_their_protocols(llm):
    from afdserve.afd.connector import Connector, TorchP2PConnector
    from afdserve.afd.executor import AFDExecutor
    from afdserve.afd.local_trace import TracedExecutor
    from afdserve.bench.decode import _StepProbe
    from afdserve.engine.executor import Executor
    members = _protocol_members(Executor)
    assert {"execute", "health", "take_lost_workers", "recovery_stats", "pids", "local_model"} <= members
    ex = llm.engine.executor                       # colocated: nothing lost, nothing restarted, no workers
    assert all(hasattr(ex, n) for n in members), [n for n in members if not hasattr(ex, n)]
    assert (ex.take_lost_workers(), ex.recovery_stats(), ex.trace_summary(), ex.pids) == ({}, {}, {}, {})
    assert ex.local_model is ex.runner.model and ex.traces is None
    probe = _StepProbe(ex, False, 512)             # the bench's wrapper is an Executor too
    assert all(hasattr(probe, n) for n in members) and probe.local_model is ex.runner.model
    methods = members - set(Executor.__annotations__)
    for cls in (AFDExecutor, TracedExecutor):
        assert all(hasattr(cls, n) for n in methods), (cls, [n for n in methods if not hasattr(cls, n)])
    conn = _protocol_members(Connector) - set(Connector.__annotations__)
    assert {"send_to_ffn", "recv_from_attention", "reply"} <= conn
    assert all(hasattr(TorchP2PConnector, n) for n in conn), [n for n in conn if not hasattr(TorchP2PConnector, n)]
