"""The 8-bit KV cache (`kv_cache_dtype="fp8"`, docs/fp8.md): storage, the native decode kernel
reading e4m3 against slow references, the engine and AFD with it, sizing and bad values."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from afdserve.cli import build_parser
from afdserve.config import Step3Config, get_preset
from afdserve.engine.engine import EngineArgs, LLMEngine
from afdserve.engine.executor import CacheConfig, make_kv_cache
from afdserve.engine.llm import LLM
from afdserve.engine.runner import ModelRunner, SeqWork, StepInput
from afdserve.model import kernels
from afdserve.model.attention import (FP8_KV, KVCache, AttentionMetadata, _gathered_decode_attention,
                                      kv_cache_dtype, naive_attention, paged_attention, write_kv)
from afdserve.model.checkpoint import load_model
from afdserve.sampling import SamplingParams

U16 = 2.0 ** -8                     # bf16 unit roundoff
needs_native = pytest.mark.skipif(not (kernels.NATIVE and kernels.FEATURES.get("f16c")),
                                  reason="afdserve._native is not built or this CPU lacks AVX2/FMA/F16C")
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [20, 21]]


@pytest.fixture
def policy_restored():
    policy = kernels.current_policy()
    yield
    kernels.use_policy(policy)


def _fp8_paged(ctx_lens, nq, d, bs, seed, amax=3.0):
    """q [S, nq, d] fp32, an fp8 paged cache (one KV head) filled through write_kv, shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-c // bs) for c in ctx_lens) + 3
    k8 = torch.zeros(nblocks * bs, 1, d, dtype=FP8_KV)
    v8 = torch.zeros_like(k8)
    k = torch.randn(nblocks * bs, 1, d, generator=gen) * amax
    v = torch.randn(nblocks * bs, 1, d, generator=gen)
    write_kv(k8, v8, torch.arange(nblocks * bs), k, v)
    perm = torch.randperm(nblocks, generator=gen).tolist()
    tables, used = [], 0
    for c in ctx_lens:
        tables.append(perm[used:used + -(-c // bs)])
        used += len(tables[-1])
    meta = AttentionMetadata.build(list(ctx_lens), [0] * len(ctx_lens), [1] * len(ctx_lens), list(ctx_lens),
                                   tables, bs)
    return torch.randn(len(ctx_lens), nq, d, generator=gen), k8, v8, meta


def test_write_kv_rounds_to_e4m3_and_clamps():
    k8 = torch.zeros(8, 1, 4, dtype=FP8_KV)
    v8 = torch.zeros_like(k8)
    k = torch.tensor([[[1000.0, -1000.0, 0.3, -2e-3]], [[5.0, 447.0, 449.0, 1e-9]]])
    write_kv(k8, v8, torch.tensor([6, 1]), k, -k)
    assert k8[6, 0].float().tolist() == [448.0, -448.0, k[0, 0, 2].to(FP8_KV).float().item(),
                                         k[0, 0, 3].to(FP8_KV).float().item()]
    assert torch.equal(k8[1].float(), k[1].clamp(-448, 448).to(FP8_KV).float())
    assert torch.equal(v8[1].float(), -k8[1].float())
    assert not k8[[0, 2, 3, 4, 5, 7]].float().any()            # other slots untouched
    kv = KVCache(2, 3, 4, 1, 4, FP8_KV)                          # other scales: a value is code x scale
    write_kv(kv.k[1], kv.v[1], torch.tensor([0]), k[1:], k[1:], (2.0, 0.5))
    assert torch.equal(kv.k[1, 0].float(), (k[1] / 2).clamp(-448, 448).to(FP8_KV).float())
    assert torch.equal(kv.v[1, 0].float(), (k[1] / 0.5).clamp(-448, 448).to(FP8_KV).float())
    assert not kv.k[0].float().any()


# bf16 queries over an e4m3 cache: AVX2 fp32 code, or (AVX512-BF16 CPUs) widened to bf16 and the
# vdpbf16ps scores / zmm values (`policy.attention_dp`)
ATTENTION_ISAS = [False] + ([True] if kernels.FEATURES.get("avx512bf16") else [])


@needs_native
@pytest.mark.parametrize("dp", ATTENTION_ISAS, ids=lambda dp: "avx512bf16" if dp else "avx2")
@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ctx_lens, nq, d", [([5], 16, 128), ([70, 3, 130, 16], 8, 24), ([200, 17], 12, 40),
                                             ([33, 9], 8, 15)])
def test_native_fp8_decode_attention_against_the_dequantized_reference(qdtype, ctx_lens, nq, d, dp, policy_restored):
    """The kernel widens e4m3 exactly (head dims with a tail of fewer than 8 too) and computes in
    fp32: against naive fp64 attention over the dequantized cache, |o - o_exact| <= 1e-4 max|v|
    (fp32 rounding, as for the fp32 cache), plus u16 |o_exact| for a bf16 output. Scales other than
    1 multiply keys and values. Threads 1 and 2 give bitwise the same output; the gathered torch
    path agrees within the same bound (bf16: plus 2 u16 max|v|, SDPA's bf16 probabilities)."""
    bs, scales = 16, (0.5, 2.0)
    q, k8, v8, meta = _fp8_paged(ctx_lens, nq, d, bs, seed=sum(ctx_lens) + d)
    q = q.to(qdtype)
    outs = []
    for threads in (1, 2):
        kernels.use_policy(dataclasses.replace(kernels.decide_policy("auto", threads=threads), attention_dp=dp))
        with torch.inference_mode():
            outs.append(kernels.native_decode_attention(q, k8, v8, meta.block_tables, meta.context_lens, bs, 0.125,
                                                        scales))
    got = outs[0]
    assert got is not None and got.dtype is qdtype and torch.equal(outs[1], got)
    with torch.inference_mode():
        gathered = _gathered_decode_attention(q, k8, v8, meta, 0.125, scales)
    for s, c in enumerate(ctx_lens):
        slots = meta.context_slots[s, :c]
        kd, vd = k8[slots].double() * scales[0], v8[slots].double() * scales[1]
        exact = naive_attention(q[s:s + 1].double(), kd, vd, 0.125)
        bound = 1e-4 * vd.abs().max() + (U16 * exact.abs() if qdtype is torch.bfloat16 else 0)
        for name, out in (("native", got), ("gathered", gathered)):
            if name == "gathered" and qdtype is torch.bfloat16:      # SDPA in bf16: probabilities rounded
                bound = bound + 2 * U16 * vd.abs().max()
            err = (out[s:s + 1].double() - exact).abs()
            assert (err <= bound).all(), f"{name} sequence {s}: worst excess {(err - bound).max().item():.3g}"


@needs_native
@needs_native
@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16])   # bf16: the AVX512-BF16 path where the CPU has it
@pytest.mark.parametrize("d", [8, 12, 40])                    # 40: 32 codes a vector on AVX-512, then a tail
def test_native_kernel_widens_every_e4m3_code_exactly(d, qdtype, policy_restored):
    """One-token contexts (zero keys): the softmax is 1 and the output is the value row itself, so
    every one of the 256 codes (vector lanes and, with d = 12, the scalar tail) must come out as
    torch's float8 -> fp32 value times the scale: finite codes exactly, the NaN codes as NaN."""
    codes = torch.arange(256, dtype=torch.int64)
    S = -(-256 // d)
    rows = torch.zeros(S * d, dtype=torch.uint8)
    rows[:256] = codes.to(torch.uint8)
    v8 = torch.zeros(S * 16, 1, d, dtype=torch.uint8)
    v8[::16, 0] = rows.view(S, d)                       # block s holds one token: codes s*d .. s*d+d-1
    v8 = v8.view(FP8_KV)
    tables = torch.arange(S).unsqueeze(1)
    kernels.use_policy(kernels.decide_policy("auto", threads=1))
    with torch.inference_mode():
        out = kernels.native_decode_attention(torch.ones(S, 4, d, dtype=qdtype), torch.zeros_like(v8), v8, tables,
                                              [1] * S, 16, 0.5, (1.0, 0.75))
    want = (v8[::16, 0].float() * 0.75).to(qdtype)
    got = out[:, 0]
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want).sum() == 2
    finite = ~torch.isnan(want)
    assert torch.equal(got[finite], want[finite])


@needs_native
def test_native_kernel_declines_what_it_cannot_read(policy_restored):
    q, k8, v8, meta = _fp8_paged([20], 8, 16, 16, seed=1)
    args = (meta.block_tables, meta.context_lens, 16, 0.25)
    kernels.use_policy(kernels.decide_policy("torch"))
    assert kernels.native_decode_attention(q, k8, v8, *args) is None          # torch mode: gathered path
    kernels.use_policy(kernels.decide_policy("auto", threads=1))
    assert kernels.native_decode_attention(q, k8, v8.float(), *args) is None  # mixed cache dtypes
    assert kernels.native_decode_attention(q, k8.float(), v8.float(), *args) is not None
    with pytest.MonkeyPatch.context() as mp:                                     # a CPU without F16C
        mp.setitem(kernels.FEATURES, "f16c", False)
        assert kernels.native_decode_attention(q, k8, v8, *args) is None
        with torch.inference_mode():
            assert torch.isfinite(paged_attention(q, k8, v8, meta, 0.25)).all()


def _logits(ckpt, kv_dtype: str, chunks: list[int]) -> torch.Tensor:
    """fp32 logits of PROMPTS' last positions: each prompt computed in `chunks` steps (sizes of
    its leading parts; the rest in one more step), through the runner and a cache of `kv_dtype`."""
    config = Step3Config.from_file(ckpt)
    model = load_model(ckpt, torch.float32, config=config)
    kv = make_kv_cache(config, CacheConfig(block_size=4, num_blocks=32, dtype=kv_dtype), torch.float32)
    runner = ModelRunner(model, kv)
    done, out = [0] * len(PROMPTS), None
    with torch.inference_mode():
        for n in chunks + [None]:
            work = []
            for i, p in enumerate(PROMPTS):
                end = len(p) if n is None else min(len(p) - 1, done[i] + n)
                work.append(SeqWork(str(i), p[done[i]:end], done[i], [i * 8 + b for b in range(8)], None))
                done[i] = end
            step = StepInput([w for w in work if w.token_ids])
            h = runner.forward(torch.tensor([t for w in step.seqs for t in w.token_ids]), runner._metadata(step))
            out = model.logits(h)
    return out[torch.tensor([len(w.token_ids) for w in step.seqs]).cumsum(0) - 1]


def test_fp8_cache_logits_close_to_fp32_and_prefill_consistent_with_decode(tiny_ckpt):
    """Prefill and decode read the same rounded K/V from the cache: a prompt's last logits computed
    in one prefill equal those of a prefill of all but the last token followed by a decode step
    (up to fp32 summation order, far below the fp8 rounding effect). Against the fp32 cache, the
    tiny random model's logits move by the e4m3 rounding of K/V: measured over 3 random seeds, max
    |dlogit| / std(logits) 0.11-0.14 and rms 0.029-0.036 (bounds 0.3 and 0.06), greedy argmax
    agreement 0.75-1.0 (bound 0.75, as for 8-bit A->F transfer)."""
    ref = _logits(tiny_ckpt, "auto", [])
    whole = _logits(tiny_ckpt, "fp8", [])
    chunked = _logits(tiny_ckpt, "fp8", [3, 2])                 # two prefill chunks, then the rest
    decoded = _logits(tiny_ckpt, "fp8", [100])                  # all but the last token, then decode
    rel = ((whole - ref).abs().max() / ref.std()).item()
    rms = ((whole - ref).pow(2).mean().sqrt() / ref.std()).item()
    print(f"fp8 KV, tiny model: max |dlogit|/std {rel:.4f}, rms {rms:.4f}")
    assert 0 < rel < 0.3 and rms < 0.06
    assert (whole.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
    for other in (chunked, decoded):
        assert ((other - whole).abs().max() / ref.std()).item() < 1e-4 < rel


def test_engine_and_afd_1a1f_with_an_fp8_cache(tiny_ckpt):
    """The engine runs with an fp8 cache; its greedy tokens agree with the fp32 cache on the tiny
    model (>= 90% of tokens), and AFD 1A1F over an fp8 cache gives exactly the colocated fp8 tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    common = dict(model=str(tiny_ckpt), device="cpu", dtype="float32", num_kv_blocks=64, block_size=4)
    toks = {}
    for name, extra in (("fp32", {}), ("fp8", {"kv_cache_dtype": "fp8"}),
                        ("afd", {"kv_cache_dtype": "fp8", "afd": "1A1F",
                                 "afd_options": {"timeout_s": 30.0, "threads_per_worker": 1}})):
        with LLM(**common, **extra) as llm:
            toks[name] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert toks["afd"] == toks["fp8"]
    pairs = [(a, b) for x, y in zip(toks["fp8"], toks["fp32"]) for a, b in zip(x, y)]
    assert sum(a == b for a, b in pairs) >= 0.9 * len(pairs), toks


def test_fp8_cache_buys_twice_the_blocks_of_bf16():
    c = get_preset("tiny")
    per_bf16 = KVCache.bytes_per_block(c.num_hidden_layers, 16, 1, c.head_dim, torch.bfloat16)
    assert KVCache.bytes_per_block(c.num_hidden_layers, 16, 1, c.head_dim, FP8_KV) * 2 == per_bf16
    budget = 1000 * per_bf16
    bf16 = CacheConfig(memory_bytes=budget).blocks_for(c, torch.bfloat16)
    fp8 = CacheConfig(memory_bytes=budget, dtype="fp8")
    assert bf16 == 1000 and fp8.blocks_for(c, torch.bfloat16) == 2000 and fp8.blocks_for(c, torch.float32) == 2000
    kv = make_kv_cache(c, CacheConfig(memory_bytes=budget // 4, dtype="fp8"), torch.bfloat16)
    assert kv.k.dtype is FP8_KV and kv.k.element_size() == 1 and kv.num_blocks == 500
    assert make_kv_cache(c, CacheConfig(num_blocks=3), torch.bfloat16).k.dtype is torch.bfloat16


def test_bad_kv_cache_dtype_is_refused_clearly(tiny_ckpt):
    assert kv_cache_dtype("auto", torch.bfloat16) is torch.bfloat16 and kv_cache_dtype("fp8", torch.float32) is FP8_KV
    for make in (lambda: CacheConfig(dtype="int8"), lambda: kv_cache_dtype("e5m2", torch.float32),
                 lambda: LLMEngine(EngineArgs(model=str(tiny_ckpt), kv_cache_dtype="fp16"))):
        with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
            make()
    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt-ids", "1", "--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8"
    for cmd in (["generate", "--prompt-ids", "1"], ["serve"], ["demo"], ["bench"]):
        assert parser.parse_args(cmd).kv_cache_dtype == "auto"
        with pytest.raises(SystemExit):
            parser.parse_args(cmd + ["--kv-cache-dtype", "int8"])


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16])
def test_paged_attention_with_an_fp8_cache_equals_the_dequantized_cache(qdtype):
    """Prefill chunks (SDPA, and the MFA block path in bf16) and decode (native or gathered) over
    an fp8 cache equal the same over the cache dequantized to q's dtype."""
    _, k8, v8, _ = _fp8_paged([40], 8, 16, 4, seed=3)
    prefill = AttentionMetadata.build(list(range(30, 40)) + list(range(6)), [0] * 16, [10, 6], [40, 6],
                                      [list(range(10)), list(range(10, 12))], 4)
    decode = AttentionMetadata.build([39, 5], [0, 0], [1, 1], [40, 6], [list(range(10)), list(range(10, 12))], 4)
    for meta in (prefill, decode):
        qq = torch.randn(len(meta.positions), 8, 16).to(qdtype)
        with torch.inference_mode():
            got = paged_attention(qq, k8, v8, meta, 0.25)
            want = paged_attention(qq, k8.to(qdtype), v8.to(qdtype), meta, 0.25)
        assert got.dtype is qdtype and torch.equal(got, want)


def test_bench_counts_an_fp8_cache_at_one_byte():
    from afdserve.bench import decode
    c = get_preset("small")
    full = decode.step_bytes(c, 8, 1024, 2)
    fp8 = decode.step_bytes(c, 8, 1024, 2, kv_elem=decode.kv_elem_bytes("fp8", 2))
    assert fp8["kv"] * 2 == full["kv"] and fp8["weights"] == full["weights"]
    assert decode.kv_elem_bytes("auto", 4) == 4


def test_default_model_answers_with_an_fp8_cache():
    """The embedded model's held-out questions (as tests/test_default_model.py scores them) with
    an 8-bit KV cache: >= 90% exact, and nearly every answer equal to the run's-dtype cache's
    (measured over 100 prompts: 97% in both, 100 of 100 answers equal)."""
    from afdserve import tasks
    examples = tasks.heldout_set(20, seed=2024)
    params = SamplingParams(temperature=0.0, max_tokens=32)
    answers = {}
    for kv in ("auto", "fp8"):
        with LLM(kv_cache_dtype=kv) as llm:
            prompts = [tasks.format_prompt(e.prompt, "chat", bos=not llm.tokenizer.add_bos) for e in examples]
            answers[kv] = [o.outputs[0].text for o in llm.generate(prompts, params)]
    assert tasks.score(examples, answers["fp8"])["overall"] >= 0.9, list(zip(answers["fp8"], answers["auto"]))
    assert sum(a == b for a, b in zip(answers["fp8"], answers["auto"])) >= 18


def test_decode_graphs_replay_the_fp8_cache_writes(tiny_ckpt, monkeypatch):
    """A recorded bf16 decode step (docs/graphs.md) replays the e4m3 rounding and byte-wise writes
    of the new K/V: the same tokens as without graphs, with replays."""
    from afdserve.engine.graphs import GRAPHS_ENV
    monkeypatch.setenv(GRAPHS_ENV, "on")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    toks, replays = {}, {}
    for graphs in (False, True):
        with LLM(model=str(tiny_ckpt), device="cpu", dtype="bfloat16", kv_cache_dtype="fp8", num_kv_blocks=64,
                 block_size=4, decode_graphs=graphs) as llm:
            toks[graphs] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
            g = llm.engine.executor.runner.graphs
            replays[graphs] = g.replays if g is not None else 0
    assert toks[True] == toks[False] and replays[True] > 0 and replays[False] == 0
