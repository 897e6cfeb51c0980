"""The decode kernels and weight layouts equal the plain F.linear / unprepared model."""
from __future__ import annotations

import copy
import dataclasses
import os
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from afdserve.config import get_preset
from afdserve.model import kernels
from afdserve.model.attention import AttentionMetadata, KVCache, naive_attention
from afdserve.model.checkpoint import init_random
from afdserve.model.kernels import is_transposed, linear, prepack, prepare_for_decode
from afdserve.model.step3 import FFNShard, Step3ForCausalLM


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request):
    """Run under 1 torch thread (OpenBLAS eligible) and 2 (MKL / oneDNN, native kernels on 2
    OpenMP threads), with the policy decided for that count; restore both after."""
    old, policy = torch.get_num_threads(), kernels.current_policy()
    torch.set_num_threads(request.param)
    kernels.use_policy(kernels.decide_policy(policy.mode))
    yield request.param
    torch.set_num_threads(old)
    kernels.use_policy(policy)


@pytest.fixture
def policy_restored():
    """Tests that install their own policy get the previous one back."""
    policy = kernels.current_policy()
    yield
    kernels.use_policy(policy)


@pytest.fixture(params=["native", "torch"])
def kernel_set(request, torch_threads):
    """With the native kernels (where built) and with torch's kernels only."""
    if request.param == "native" and not kernels.NATIVE:
        pytest.skip("afdserve._native is not built on this machine")
    kernels.use_policy(kernels.decide_policy("auto" if request.param == "native" else "torch"))
    return request.param


def _without_native(policy: kernels.KernelPolicy) -> kernels.KernelPolicy:
    return dataclasses.replace(policy, native_rows={}, attention=frozenset())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8, 9, 33])
@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_linear_equals_f_linear_for_every_layout(rows, shape, kernel_set):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(*shape, generator=g)
    x = torch.randn(rows, shape[1], generator=g)
    want = F.linear(x, w)
    wt = w.t().contiguous().t()
    assert is_transposed(wt) and not is_transposed(w) and torch.equal(wt, w)
    torch.testing.assert_close(linear(x, w), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, wt), want, rtol=1e-5, atol=1e-5)
    packed = prepack(w)
    if kernels.ONEDNN:
        assert packed is not None
    torch.testing.assert_close(linear(x, wt, packed), want, rtol=1e-5, atol=1e-5)
    # non-contiguous activations (a column slice of a fused projection) take the same paths
    xs = torch.randn(rows, shape[1] + 5, generator=g)[:, 5:]
    torch.testing.assert_close(linear(xs, wt, packed), F.linear(xs, w), rtol=1e-5, atol=1e-5)


def test_linear_dispatch_openblas_only_with_one_thread_and_no_grad_needed(torch_threads, monkeypatch):
    if not kernels.OPENBLAS:
        pytest.skip("numpy's OpenBLAS not found")
    kernels.use_policy(_without_native(kernels.current_policy()))
    calls = []
    real = kernels._openblas_linear
    monkeypatch.setattr(kernels, "_openblas_linear", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    w = torch.randn(64, 32).t().contiguous().t()
    for rows in (1, 2, 3, 4, 9):
        linear(torch.randn(rows, 32), w)
    assert calls == ([1, 4, 9] if torch_threads == 1 else [])
    calls.clear()
    linear(torch.randn(4, 32), w.contiguous())            # checkpoint layout: OpenBLAS too
    assert calls == ([4] if torch_threads == 1 else [])
    calls.clear()
    linear(torch.randn(4, 32), torch.randn(64, 64)[:, :32])   # other strides: never
    assert calls == []
    # a weight that needs gradients keeps autograd (F.linear), and the gradient is right
    wg = w.detach().clone().requires_grad_(True)
    x = torch.randn(4, 32)
    linear(x, wg).sum().backward()
    assert calls == [] and torch.allclose(wg.grad, x.sum(0).expand(64, 32))
    with torch.no_grad():
        linear(x, wg)
    assert calls == ([4] if torch_threads == 1 else [])


def test_linear_dispatch_native_by_rows_and_layout(torch_threads, monkeypatch):
    if not kernels.NATIVE:
        pytest.skip("afdserve._native is not built on this machine")
    policy = kernels.current_policy()
    assert policy.threads == torch_threads
    native, blas = [], []
    real_native, real_blas = kernels._native_call, kernels._openblas_linear
    monkeypatch.setattr(kernels, "_native_call", lambda x, w, *a: native.append(x.shape[0]) or real_native(x, w, *a))
    monkeypatch.setattr(kernels, "_openblas_linear", lambda x, w: blas.append(x.shape[0]) or real_blas(x, w))
    wt = torch.randn(64, 32).t().contiguous().t()          # transposed storage
    w = torch.randn(32, 64)                                 # checkpoint layout
    sliced = torch.randn(40, 64)[4:36]                      # rows of a fused matrix: still eligible
    rows = (1, 2, 8, 9, 32, 33)
    for r in rows:
        linear(torch.randn(r, 32), wt)
        linear(torch.randn(r, 64), w)
        linear(torch.randn(r, 64), sliced)
    lim_t, lim = policy.native_max_rows(torch.float32, True), policy.native_max_rows(torch.float32, False)
    assert lim_t >= 1 and lim >= 8                          # the measured choice: native for decode rows
    assert native == [r for r in rows for n in (lim_t, lim, lim) if r <= n]
    blas_rows = [r for r in rows for n in (lim_t, lim, lim) if r > n and (r == 1 or r >= 4)]
    assert blas == (blas_rows if policy.openblas else [])
    native.clear()
    wg = wt.detach().clone().requires_grad_(True)           # autograd needed: F.linear
    linear(torch.randn(2, 32), wg).sum().backward()
    assert native == [] and wg.grad is not None
    # a weight whose inner dimension does not match raises torch's shape error, not a crash
    with pytest.raises(RuntimeError):
        kernels._native_linear(torch.randn(2, 31), w)
    # strides the kernels cannot read are refused by name (linear sends such weights elsewhere)
    with pytest.raises(ValueError, match="strides"):
        kernels._native_linear(torch.randn(2, 32), torch.randn(64, 64)[:, ::2])
    # empty products are empty (or zero), as with F.linear
    assert kernels._native_linear(torch.randn(0, 64), w).shape == (0, 32)
    assert torch.equal(kernels._native_linear(torch.randn(3, 0), torch.randn(5, 0)), torch.zeros(3, 5))


@pytest.mark.skipif(not kernels.NATIVE, reason="afdserve._native is not built on this machine")
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 32])
@pytest.mark.parametrize("shape", [(37, 29), (29, 37), (8, 8), (3, 100), (1, 17), (130, 7), (16, 1)])
def test_native_kernels_equal_f_linear_with_tails_and_strides(rows, shape):
    """Both layouts, sizes that are not multiples of the kernels' blocks (8-float vectors, 3/4/8
    weight rows, 8 k-rows, 4-row groups), weights that are slices of a wider fused matrix and
    activations that are column slices."""
    out, inp = shape
    g = torch.Generator().manual_seed(rows * 1000 + out)
    fused = torch.randn(out + 5, inp + 3, generator=g)
    w = fused[2:2 + out, 1:1 + inp]                          # checkpoint layout, ldw > inp
    wt_mem = torch.randn(inp, out + 6, generator=g)
    wt = wt_mem[:, 3:3 + out].t()                             # transposed storage, ldw > out
    assert kernels.is_transposed(wt) or out == 1
    x = torch.randn(rows, inp + 4, generator=g)[:, 4:]
    for weight in (w, wt):
        got = kernels._native_linear(x, weight)
        torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-5)
        assert got.shape == (rows, out) and got.is_contiguous()


@pytest.mark.skipif(not kernels.NATIVE, reason="afdserve._native is not built on this machine")
def test_native_sgemm_refuses_inconsistent_arguments():
    from afdserve import _native
    x, w, y = torch.randn(2, 8), torch.randn(4, 8), torch.empty(2, 4)
    ok = (x.data_ptr(), 8, w.data_ptr(), 8, y.data_ptr(), 4, 2, 4, 8, False)
    _native.sgemm(*ok)
    torch.testing.assert_close(y, x @ w.t())
    for i, bad in [(1, 7), (3, 7), (5, 3), (6, -1), (0, 0)]:       # ld < row length, negative, null
        args = list(ok)
        args[i] = bad
        with pytest.raises(ValueError):
            _native.sgemm(*args)
    with pytest.raises(ValueError):                                    # transposed: ldw >= n
        _native.sgemm(x.data_ptr(), 8, w.data_ptr(), 3, y.data_ptr(), 4, 2, 4, 8, True)
    with pytest.raises(TypeError):
        _native.sgemm(1, 2, 3)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("cc") is None or
                    not {"avx2", "fma"} <= kernels.cpu_flags(),
                    reason="needs an x86-64 CPU with AVX2/FMA and a C compiler")
def test_native_kernels_are_built_where_they_can_run():
    """The install compiles afdserve._native when a compiler is present (setup.py, optional so a
    machine without one still installs); here one is, so a silent build failure is an error."""
    assert kernels.NATIVE


def _storages(model):
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}


def _run(model, ids, positions, kv_seed=0, dtype=torch.float32):
    c = model.config
    S = len(ids)
    kv = KVCache(c.num_hidden_layers, 4 * S + 1, 4, c.num_attention_groups, c.head_dim, dtype)
    gen = torch.Generator().manual_seed(kv_seed)
    kv.k.copy_(torch.randn(kv.k.shape, generator=gen).to(dtype))
    kv.v.copy_(torch.randn(kv.v.shape, generator=gen).to(dtype))
    tables = [[1 + 4 * s + j for j in range(4)] for s in range(S)]
    meta = AttentionMetadata.build(positions, [tables[s][p // 4] * 4 + p % 4 for s, p in enumerate(positions)],
                                   [1] * S, [p + 1 for p in positions], tables, 4)
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids), meta, kv))


@pytest.mark.parametrize("batch", [1, 2, 5, 9])
def test_prepared_model_matches_unprepared(batch, torch_threads):
    config = get_preset("tiny")
    plain = init_random(Step3ForCausalLM(config), seed=3)
    plain.init_rope()
    fast = copy.deepcopy(plain)
    before = {n: p.detach().clone() for n, p in fast.named_parameters()}
    bytes_before = sum(_storages(fast).values())
    prepare_for_decode(fast)
    prepare_for_decode(fast)                       # idempotent
    # same parameters, same values, no extra memory (fused tensors are the parameters' storage)
    after = dict(fast.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert sum(_storages(fast).values()) == bytes_before
    attn = fast.layers[1].self_attn
    assert attn.qkv_a is not None and attn.q_proj.weight.untyped_storage().data_ptr() == \
        attn.qkv_a.untyped_storage().data_ptr()
    moe = fast.layers[1].moe
    assert moe.gate_up is not None and moe.gate_up.shape[-2] == 2 * moe.gate_proj.weight.shape[-2]
    assert is_transposed(fast.layers[0].mlp.gate_up) and is_transposed(fast.lm_head.weight)  # wide ones
    assert is_transposed(moe.down_proj.weight[0])
    # out <= in: transposed only for OpenBLAS without native kernels, and not when in >= 2 out
    w = attn.qkv_a
    assert is_transposed(w) == (kernels.one_thread_mode() and not kernels.NATIVE and w.shape[1] < 2 * w.shape[0])
    assert not is_transposed(fast.layers[0].mlp.down_proj.weight)       # [H, W], W >= 2 H in tiny
    ids = [(7 * s + 3) % config.vocab_size for s in range(batch)]
    positions = [5 + s for s in range(batch)]
    torch.testing.assert_close(_run(fast, ids, positions), _run(plain, ids, positions), rtol=1e-4, atol=1e-4)


def test_prepared_ffn_shard_matches_unprepared():
    config = get_preset("tiny")
    full = init_random(Step3ForCausalLM(config), seed=1)
    state = dict(full.named_parameters())
    shard = Step3ForCausalLM(config, role="ffn", shard=FFNShard(1, 2))
    slices = shard.shard_slices()
    with torch.no_grad():
        for name, p in shard.named_parameters():
            dim, a, b = slices.get(name, (0, 0, p.shape[0]))
            p.copy_(state[name].narrow(dim, a, b - a))
    fast = prepare_for_decode(copy.deepcopy(shard))
    x = torch.randn(6, config.hidden_size)
    for layer_id in (0, 1):
        inp = full.layers[layer_id].ffn_input(x)
        torch.testing.assert_close(fast.layers[layer_id].ffn_half(inp), shard.layers[layer_id].ffn_half(inp),
                                   rtol=1e-5, atol=1e-5)


def test_rope_lookup_is_reused_per_positions_tensor_and_refreshed_for_new_ones():
    from afdserve.model.layers import RotaryEmbedding, rotate_half
    rope = RotaryEmbedding(8, 10000.0, 64)
    x = torch.randn(3, 2, 8)

    def direct(pos):
        cos, sin = rope.cos[pos].unsqueeze(1), rope.sin[pos].unsqueeze(1)
        return x * cos + rotate_half(x) * sin

    p1, p2 = torch.tensor([0, 5, 9]), torch.tensor([1, 2, 63])
    for pos in (p1, p1, p2, p1):
        torch.testing.assert_close(rope(x, pos), direct(pos))


def test_rmsnorm_fp32_fast_path_equals_the_formula():
    from afdserve.model.layers import RMSNorm
    norm = RMSNorm(24, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, 24)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), want)


# ----------------------------------------------------------------------------- bf16 kernels
#
# Tolerances from bf16's unit roundoff. A bf16 value has an 8-bit significand (7 stored bits), so
# rounding to bf16 is off by at most u16 = 2^-8 relative; fp32 accumulation adds at most
# u32 = 2^-24 relative per operation. The kernels widen the bf16 inputs exactly (or, with
# vdpbf16ps, form exact bf16 x bf16 products: 8 x 8 significand bits fit in fp32's 24), sum the K
# products in fp32 in some order (a sum of K terms in any order errs by at most
# (K - 1) u32 sum|x_k w_k| to first order; the final horizontal sums add at most 4 more
# operations) and round once to bf16. Against the exact product of the same bf16 inputs (fp64
# here: its own error is negligible) each output y therefore satisfies
#     |y - y_exact| <= u16 |y_exact| + (1 + u16) (K + 4) u32 sum_k |x_k w_k|.
U16, U32 = 2.0 ** -8, 2.0 ** -24


def _bf16_gemm_bound(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact x @ w^T of the bf16 inputs, the bound above per output)."""
    xd, wd = x.double(), w.double()
    exact = xd @ wd.t()
    k = x.shape[1]
    return exact, U16 * exact.abs() + (1 + U16) * (k + 4) * U32 * (xd.abs() @ wd.abs().t())


def _bf16_isas() -> list[int]:
    return [kernels.ISA_AVX2] + ([kernels.ISA_AVX512BF16, kernels.ISA_AVX512BF16_PACKED]
                                 if kernels.FEATURES.get("avx512bf16") else [])


needs_native = pytest.mark.skipif(not kernels.NATIVE, reason="afdserve._native is not built on this machine")


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 32])
@pytest.mark.parametrize("shape", [(37, 29), (29, 37), (8, 8), (3, 100), (1, 17), (130, 7), (64, 768), (67, 66)])
def test_native_bf16_gemms_within_the_bf16_bound_of_the_exact_product(rows, shape):
    """Both layouts, every instruction set, tails of every block size (8-wide vectors, 32-wide
    vdpbf16ps steps with masked loads, 3/4/8 weight rows, 4-row groups; the repacked kernel's
    32-output blocks, 16-pair transposes and 12-row groups), slices of fused matrices."""
    out, inp = shape
    g = torch.Generator().manual_seed(rows * 1000 + out)
    w = torch.randn(out + 5, inp + 3, generator=g).bfloat16()[2:2 + out, 1:1 + inp]
    wt = torch.randn(inp, out + 6, generator=g).bfloat16()[:, 3:3 + out].t()
    x = torch.randn(rows, inp + 4, generator=g).bfloat16()[:, 4:]
    exact, bound = _bf16_gemm_bound(x, w)
    for isa in _bf16_isas():
        if isa == kernels.ISA_AVX512BF16_PACKED and inp % 2:
            with pytest.raises(ValueError, match="even k"):       # it multiplies k pairs
                kernels._native_linear(x, w, 1, isa)
            continue
        got = kernels._native_linear(x, w, 1, isa)
        assert got.dtype is torch.bfloat16 and got.shape == (rows, out)
        err = (got.double() - exact).abs()
        assert (err <= bound).all(), f"isa {isa}: worst excess {(err - bound).max().item():.3g}"
    exact_t, bound_t = _bf16_gemm_bound(x, wt)
    got = kernels._native_linear(x, wt, 1)
    assert ((got.double() - exact_t).abs() <= bound_t).all()
    # torch's own bf16 product meets the bound too; and it is tight: outputs off by 4 bf16 ulps fail it
    assert ((F.linear(x, w).double() - exact).abs() <= bound).all()
    assert not ((exact * (1 + 4 * U16) - exact).abs() <= bound).all()
    from afdserve import _native
    with pytest.raises(ValueError, match="AVX512-BF16"):          # vdpbf16ps cannot read [in, out]
        _native.bgemm(x.data_ptr(), x.stride(0), wt.data_ptr(), wt.stride(1), got.data_ptr(), out, rows, out, inp,
                      True, 1, kernels.ISA_AVX512BF16)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 32])
def test_native_gemms_are_bitwise_equal_on_any_thread_count(dtype, rows):
    """Outputs are split over threads on multiples of 8 columns (32: the repacked kernel), each computed by the same
    instructions in the same order, so 1, 2, 3 and 8 threads give identical bits."""
    g = torch.Generator().manual_seed(rows)
    for out, inp in ((4099, 257), (300, 1024), (1000, 258)):  # enough work for several threads
        w = torch.randn(out, inp, generator=g).to(dtype)
        x = torch.randn(rows, inp, generator=g).to(dtype)
        for weight in (w, w.t().contiguous().t()):
            isas = _bf16_isas() if dtype is torch.bfloat16 and not kernels.is_transposed(weight) else [None]
            for isa in [i for i in isas if i != kernels.ISA_AVX512BF16_PACKED or inp % 2 == 0]:
                one = kernels._native_linear(x, weight, 1, isa)
                for threads in (2, 3, 8):
                    assert torch.equal(kernels._native_linear(x, weight, threads, isa), one), (threads, isa)


def _paged(S, ctx_lens, nq, g, d, bs, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-c // bs) for c in ctx_lens) + 3
    k = torch.randn(nblocks * bs, g, d, generator=gen).to(dtype)
    v = torch.randn(nblocks * bs, g, d, generator=gen).to(dtype)
    q = torch.randn(S, nq, d, generator=gen).to(dtype)
    perm = torch.randperm(nblocks, generator=gen).tolist()
    width = max(-(-c // bs) for c in ctx_lens)
    tables, used = torch.zeros(S, width, dtype=torch.int64), 0
    for s, c in enumerate(ctx_lens):
        n = -(-c // bs)
        tables[s, :n] = torch.tensor(perm[used:used + n])
        used += n
    return q, k, v, tables


# The bf16 decode attention's two instruction sets: AVX2 fp32 (keys and values widened), and where
# the CPU has AVX512-BF16 scores on vdpbf16ps and values in 16-head zmm blocks (`attention_dp`).
ATTENTION_ISAS = [False] + ([True] if kernels.FEATURES.get("avx512bf16") else [])


def _attention_policy(threads: int, dp: bool) -> kernels.KernelPolicy:
    return kernels.use_policy(dataclasses.replace(kernels.decide_policy("auto", threads=threads), attention_dp=dp))


@needs_native
@pytest.mark.parametrize("dp", ATTENTION_ISAS, ids=lambda dp: "avx512bf16" if dp else "avx2")
@pytest.mark.parametrize("ctx_lens, nq, g, d", [([5], 16, 1, 128), ([70, 3, 130], 8, 2, 24), ([200, 17], 12, 1, 40),
                                                ([300], 20, 1, 36)])
def test_native_bf16_decode_attention_within_the_bf16_bound(ctx_lens, nq, g, d, dp, policy_restored):
    """bf16 q / K / V cache, fp32 math inside, output rounded once. The keys and values are
    widened exactly, scores and softmax run in fp32 (relative error a few hundred u32 at these
    sizes, plus the exp polynomial's 2e-7), and the weighted sum of values errs by at most that
    times max|v|; the final rounding adds u16 |o|. Bound per output:
        |o - o_exact| <= u16 |o_exact| + 1e-4 max|v|    (1e-4 >> (ctx + d + 64) u32 + 2e-7)."""
    S, bs = len(ctx_lens), 16
    q, k, v, tables = _paged(S, ctx_lens, nq, g, d, bs, torch.bfloat16, seed=sum(ctx_lens))
    _attention_policy(1, dp)
    with torch.inference_mode():
        got = kernels.native_decode_attention(q, k, v, tables, ctx_lens, bs, 0.125)
    assert got is not None and got.dtype is torch.bfloat16
    for s, c in enumerate(ctx_lens):
        slots = (tables[s, :, None] * bs + torch.arange(bs)).reshape(-1)[:c]
        exact = naive_attention(q[s:s + 1].double(), k[slots].double(), v[slots].double(), 0.125)
        err = (got[s:s + 1].double() - exact).abs()
        bound = U16 * exact.abs() + 1e-4 * v[slots].double().abs().max()
        assert (err <= bound).all(), f"sequence {s}: worst excess {(err - bound).max().item():.3g}"


@needs_native
@pytest.mark.parametrize("dp", ATTENTION_ISAS, ids=lambda dp: "avx512bf16" if dp else "avx2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("ctx_lens, nq, g, d", [([300], 32, 1, 64), ([40, 7, 129, 64], 32, 1, 64),
                                                ([2053], 12, 1, 40), ([1500], 16, 2, 72), ([999, 1201], 8, 1, 128)])
def test_native_decode_attention_is_bitwise_equal_on_any_thread_count(dtype, ctx_lens, nq, g, d, dp, policy_restored):
    """Sequences x KV heads are split over the threads; with fewer of those than threads (batch 1),
    each is attended by the whole team: its keys, then its softmax columns, then its value columns
    split over the threads. Every score and output column runs the same instructions as with one
    thread (also with head and column tails: 12 heads, d = 40 / 72)."""
    if dtype is torch.float8_e4m3fn and not kernels.FEATURES.get("f16c"):
        pytest.skip("an e4m3 cache needs F16C")
    cache = dtype
    if dtype is torch.float8_e4m3fn:
        dtype = torch.bfloat16
    q, k, v, tables = _paged(len(ctx_lens), ctx_lens, nq, g, d, 16, dtype, seed=len(ctx_lens))
    k, v = k.to(cache), v.to(cache)
    outs = []
    for threads in (1, 2, 3, 8):
        _attention_policy(threads, dp)
        with torch.inference_mode():
            outs.append(kernels.native_decode_attention(q, k, v, tables, ctx_lens, 16, 0.2, (0.5, 2.0)))
    assert outs[0] is not None
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


# ----------------------------------------------------------------------------- the policy
def test_policy_modes_and_the_environment(monkeypatch, policy_restored):
    torch_only = kernels.decide_policy("torch", threads=2)
    assert torch_only.mode == "torch" and torch_only.threads == 2
    assert not torch_only.native_rows and not torch_only.attention and not torch_only.openblas
    auto = kernels.decide_policy("auto", threads=3)
    assert auto.threads == (1 if kernels.NATIVE and not kernels.FEATURES["openmp"] else 3)
    if kernels.NATIVE:
        assert auto.native_max_rows(torch.bfloat16, False) >= 1 and torch.bfloat16 in auto.attention
        forced = kernels.decide_policy("native", threads=1)
        assert forced.native_max_rows(torch.float32, True) == kernels.FORCED_NATIVE_ROWS
        assert forced.bf16_isa == (kernels.ISA_AVX512BF16 if kernels.FEATURES["avx512bf16"] else kernels.ISA_AVX2)
    else:
        with pytest.raises(ValueError, match="not built"):
            kernels.decide_policy("native")
    with pytest.raises(ValueError, match="unknown kernel mode 'fast'"):
        kernels.decide_policy("fast")
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    assert kernels.decide_policy().mode == "torch"
    monkeypatch.setenv(kernels.KERNELS_ENV, "Auto ")
    assert kernels.decide_policy().mode == "auto"
    assert "decode attention" in auto.describe() and "OpenMP runtime" in auto.describe()


def test_linear_and_attention_read_the_policy_not_the_thread_count(monkeypatch, policy_restored):
    """The choice is made once: a call consults neither torch's thread count nor the CPU."""
    kernels.use_policy(kernels.decide_policy("auto", threads=1))

    def forbidden(*_):
        raise AssertionError("re-derived per call")
    monkeypatch.setattr(torch, "get_num_threads", forbidden)
    monkeypatch.setattr(kernels, "decide_policy", forbidden)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(48, 32).to(dtype)
        for rows in (1, 4, 40):
            linear(torch.randn(rows, 32).to(dtype), w)
        q, k, v, tables = _paged(2, [9, 20], 4, 1, 16, 4, dtype, seed=1)
        with torch.inference_mode():
            kernels.native_decode_attention(q, k, v, tables, [9, 20], 4, 0.3)


def test_torch_policy_never_calls_the_native_kernels(monkeypatch, policy_restored):
    kernels.use_policy(kernels.decide_policy("torch"))
    monkeypatch.setattr(kernels, "_native_call", lambda *a: pytest.fail("native kernel called"))
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(48, 32).to(dtype)
        torch.testing.assert_close(linear(torch.randn(2, 32).to(dtype), w).float().shape, torch.Size([2, 48]))
        q, k, v, tables = _paged(1, [9], 4, 1, 16, 4, dtype, seed=2)
        assert kernels.native_decode_attention(q, k, v, tables, [9], 4, 0.3) is None


def test_prepare_for_decode_decides_the_policy_for_the_workers_thread_count(policy_restored):
    """A worker sets its threads, then loads: the policy follows (native kernels on that many
    OpenMP threads where built with OpenMP)."""
    old = torch.get_num_threads()
    multi = kernels.NATIVE and kernels.FEATURES["openmp"]
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            prepare_for_decode(init_random(Step3ForCausalLM(get_preset("tiny")), seed=0))
            assert kernels.current_policy().threads == (threads if multi else 1)
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not (kernels.NATIVE and kernels.FEATURES.get("openmp")), reason="built without OpenMP")
def test_one_openmp_runtime_in_the_process_and_it_is_torchs():
    """The extension links libgomp.so.1; torch's wheel ships one under that soname and is loaded
    first, so the loader binds both to it: one runtime, one thread pool."""
    runtimes = kernels.openmp_runtimes()
    torch_libs = os.path.dirname(torch.__file__)
    assert len(runtimes) == 1, runtimes
    if any(os.path.exists(os.path.join(torch_libs, "lib", n)) for n in ("libgomp.so.1",)):
        assert runtimes[0].startswith(torch_libs)


# ----------------------------------------------------------------------------- dtype auto
def test_dtype_auto_resolution(monkeypatch):
    resolve = kernels.resolve_dtype
    assert resolve("float32", "bfloat16", "cpu") == "float32" and resolve("bfloat16", "float32", "cpu") == "bfloat16"
    assert resolve("auto", "float32", "cuda") == "bfloat16"
    for has_bf16 in (True, False):
        monkeypatch.setattr(kernels, "cpu_has_bf16_arithmetic", lambda: has_bf16)
        assert resolve("auto", "bfloat16", "cpu") == "bfloat16"      # bf16 checkpoint: always bf16
        assert resolve("auto", "float16", "cpu") == "bfloat16"
        assert resolve("auto", "float32", "cpu") == ("bfloat16" if has_bf16 else "float32")
    assert kernels.cpu_has_bf16_arithmetic() in (True, False)


def test_engine_and_llm_default_to_auto(tiny_ckpt, monkeypatch):
    import inspect

    from afdserve.engine.engine import EngineArgs, LLMEngine
    from afdserve.engine.llm import LLM
    assert EngineArgs().dtype == "auto" and inspect.signature(LLM).parameters["dtype"].default == "auto"
    for has_bf16, want in ((True, torch.bfloat16), (False, torch.float32)):   # tiny_ckpt is an fp32 checkpoint
        monkeypatch.setattr(kernels, "cpu_has_bf16_arithmetic", lambda: has_bf16)
        engine = LLMEngine(EngineArgs(model=tiny_ckpt, device="cpu", num_kv_blocks=8, block_size=4))
        assert engine.dtype == str(want).removeprefix("torch.")
        assert engine.executor.runner.model.lm_head.weight.dtype is want


@pytest.mark.parametrize("batch", [1, 6])
def test_bf16_model_logits_close_to_fp32(batch, policy_restored):
    """The tiny model in bf16 (weights, activations, KV; native kernels where built) against fp32
    and against bf16 through torch's kernels. Every matmul output and the residual stream are
    rounded to bf16 (2^-8 relative), over 4 layers of random weights: the logits of either bf16
    run move by up to ~10% of their scale from fp32 (measured 8% at batch 1, the same for both
    kernel sets), while the two bf16 runs differ only by their summation order and rounding
    points (measured <= 2.5%)."""
    config = get_preset("tiny")
    fp32 = init_random(Step3ForCausalLM(config), seed=4)
    fp32.init_rope()
    bf16 = prepare_for_decode(copy.deepcopy(fp32).to(torch.bfloat16))
    bf16.init_rope()
    ids, positions = [(11 * s + 5) % config.vocab_size for s in range(batch)], [3 + 2 * s for s in range(batch)]
    ref = _run(prepare_for_decode(fp32), ids, positions)
    got = _run(bf16, ids, positions, dtype=torch.bfloat16)
    kernels.use_policy(kernels.decide_policy("torch"))
    via_torch = _run(bf16, ids, positions, dtype=torch.bfloat16)
    scale = ref.abs().max()
    assert got.dtype is torch.float32
    assert (got - via_torch).abs().max() <= 0.05 * scale
    assert (got - ref).abs().max() <= 0.15 * scale and (via_torch - ref).abs().max() <= 0.15 * scale


# ----------------------------------------------------------------------------- element-wise steps
def _with_policy(mode: str, fn):
    kernels.use_policy(kernels.decide_policy(mode))
    with torch.no_grad():
        return fn()


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3, 40, 300])         # 300: rows split over the threads
@pytest.mark.parametrize("d", [128, 20])                      # 20: 8 pairs a vector, 2 in the scalar tail
def test_native_rope_is_bitwise_the_torch_formula(dtype, tokens, d, policy_restored):
    """Same products and sum in fp32, one rounding: bit for bit the torch path, for q ([T, heads, d])
    and for k sliced out of a fused qkv output (token stride > heads * d)."""
    from afdserve.model.layers import RotaryEmbedding
    g = torch.Generator().manual_seed(tokens)
    rope = RotaryEmbedding(d, 5e5, 512)
    q = torch.randn(tokens, 4, d, generator=g).to(dtype)
    q[0, 0, 3] = float("nan")                                   # NaN stays NaN, as torch's
    k = torch.randn(tokens, 640, generator=g).to(dtype)[:, 384:384 + d].view(tokens, 1, d)
    pos = torch.randint(0, 512, (tokens,), generator=g)
    for x in (q, k):
        def run():
            rope._positions = None
            return rope(x, pos)
        assert _with_policy("auto", lambda: kernels.native_rope(x, pos, rope.cos, rope.sin)) is not None
        got, want = _with_policy("auto", run), _with_policy("torch", run)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    with pytest.raises(ValueError, match="position 512 outside"):
        _with_policy("auto", lambda: kernels.native_rope(q, torch.full((tokens,), 512), rope.cos, rope.sin))


@needs_native
@pytest.mark.parametrize("rows", [1, 5, 70, 400])            # 400: rows split over the threads
def test_native_rms_norm_and_silu_mul_round_as_the_torch_formulas(rows, policy_restored):
    """bf16: fp32 math and the formulas' roundings; only the mean of squares / exp may differ in
    the last fp32 bit. That can move the intermediate bf16 value (x * r, silu(g)) by one ulp
    (<= 2^-7 relative), which the product carries, plus a different final rounding (2^-8)."""
    from afdserve.model.layers import RMSNorm, silu_mul
    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(768, 1e-5).bfloat16()
    norm.weight.data = torch.randn(768, generator=g).bfloat16()
    x = (torch.randn(rows, 800, generator=g) * 3).bfloat16()[:, 16:784]          # row stride 800
    gu = (torch.randn(rows, 1030, generator=g) * 4).bfloat16()[:, 3:1027]       # a [M, 2W] slice
    for fn in (lambda: norm(x), lambda: silu_mul(gu)):
        got, ref = _with_policy("auto", fn), _with_policy("torch", fn)
        assert got.dtype is torch.bfloat16 and got.shape == ref.shape
        step = ref.float().abs() * 3 * U16 + 1e-30
        assert ((got.float() - ref.float()).abs() <= step).all()
        assert (got == ref).float().mean() > 0.99                                # not merely close
    both = lambda: (kernels.native_rms_norm(x, norm.weight, 1e-5), kernels.native_silu_mul(gu))  # noqa: E731
    assert all(y is not None for y in _with_policy("auto", both))
    assert all(y is None for y in _with_policy("torch", both))                    # the reference path
    assert kernels.native_rms_norm(x, norm.weight, 1e-5) is None                  # autograd wanted: torch's


@needs_native
@pytest.mark.parametrize("mode,threads", [("auto", 1), ("native", 1), ("auto", 2)])   # 2: experts per thread
def test_native_moe_is_bitwise_the_python_moe(mode, threads, monkeypatch, policy_restored):
    """The one-call MoE (moe.c) groups, multiplies and combines with the kernels and roundings of
    MoE.forward, so its output is bit for bit the Python path's under the same policy; a local
    slice of the experts (an FFN shard) and slots routed elsewhere included. An expert with more
    rows than the policy's native GEMMs take sends the layer back to the Python path."""
    from afdserve.model import layers
    from afdserve.model.layers import MoE, SwiGLU, route
    kernels.use_policy(kernels.decide_policy(mode, threads))
    g = torch.Generator().manual_seed(3)
    moe, shared = MoE(96, 64, 8, 3, False, experts=(2, 7)).bfloat16(), SwiGLU(96, 40).bfloat16()
    for p in [*moe.parameters(), *shared.parameters()]:
        p.data = (torch.randn(p.shape, generator=g) * 0.1).bfloat16()
    kernels.prepare_for_decode(moe)
    kernels.prepare_for_decode(shared)
    with torch.no_grad():
        for T in (1, 2, 9, 40):
            x = torch.randn(T, 96, generator=g).bfloat16()
            w, ids = route(torch.randn(T, 8, generator=g), 3, False)
            fused = kernels.native_moe(x, w, ids, moe.gate_up, moe.down_proj.weight, moe.first)
            with_shared = kernels.native_moe(x, w, ids, moe.gate_up, moe.down_proj.weight, moe.first,
                                             (shared.gate_up, shared.down_proj.weight))
            with monkeypatch.context() as m:
                m.setattr(layers, "native_moe", lambda *a: None)
                python = moe(x, w, ids)
            assert fused is not None and torch.equal(fused, python), T
            assert torch.equal(with_shared, python + shared(x)), T        # as Step3DecoderLayer.ffn_half adds it
        skewed = torch.full((80, 3), 3)                  # 240 rows for one expert: > 64 in `native`
        skewed[:, 1], skewed[:, 2] = 4, 5
        x = torch.randn(80, 96, generator=g).bfloat16()
        got = kernels.native_moe(x, torch.rand(80, 3, generator=g), skewed, moe.gate_up, moe.down_proj.weight, moe.first)
        assert (got is None) == (mode == "native")


@needs_native
@pytest.mark.parametrize("t,ctx", [(1, 1), (5, 5), (128, 128), (200, 200), (70, 300), (1, 40)])
def test_native_causal_attention_matches_the_naive_reference(t, ctx, policy_restored):
    """The last t positions of a sequence (a whole prompt, or a later chunk: t < ctx) over MFA's
    single KV head, block by block with native fp32 scores and softmax: against the slow fp32
    reference within bf16 rounding (probabilities rounded to bf16 before the product with V:
    <= 2^-8 relative per term), and against the SDPA path."""
    from afdserve.model import attention
    if not kernels.FEATURES.get("avx512bf16"):
        pytest.skip("the scores kernel needs AVX512-BF16")
    g = torch.Generator().manual_seed(t * 1000 + ctx)
    q = torch.randn(t, 16, 128, generator=g).bfloat16()
    k = (torch.randn(ctx, 1, 128, generator=g) * 2).bfloat16()
    v = torch.randn(ctx, 1, 128, generator=g).bfloat16()
    kernels.use_policy(kernels.decide_policy("auto"))
    with torch.no_grad():
        got = attention._mfa_causal_attention(q, k, v, 0.088)
        assert got is not None and got.shape == q.shape and got.dtype is torch.bfloat16
        ref = attention.naive_attention(q.float(), k.float(), v.float(), 0.088)
        bound = 2 ** -7 * v.float().abs().max()
        assert (got.float() - ref).abs().max() <= bound
        scores = kernels.native_scores(q.reshape(-1, 128), k[:, 0])         # fp32, not rounded
        xd, wd = q.reshape(-1, 128).double(), k[:, 0].double()
        assert ((scores.double() - xd @ wd.t()).abs() <= 132 * U32 * (xd.abs() @ wd.abs().t())).all()
        from afdserve import _native
        with pytest.raises(ValueError, match="fp32 outputs"):               # only the repacked kernel has them
            _native.bgemm(q.data_ptr(), 128, k.data_ptr(), 128, scores.data_ptr(), ctx, 1, ctx, 128, False, 1,
                          kernels.ISA_AVX512BF16, True)
        kernels.use_policy(kernels.decide_policy("torch"))
        assert attention._mfa_causal_attention(q, k, v, 0.088) is None          # the reference path: SDPA
        assert (got.float() - attention._sequence_attention(q, k, v, 0.088).float()).abs().max() <= bound


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_write_kv_equals_index_copy(dtype, policy_restored):
    """One native call writes a step's keys and values where the two index_copy_ would: k made
    contiguous by RoPE, v a strided slice of the fused projection output; a slot outside the cache
    raises before anything is written; an fp8 cache or a mixed dtype is left to torch."""
    kernels.use_policy(kernels.decide_policy("auto", threads=1))
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.zeros(64, 1, 24, dtype=dtype), torch.zeros(64, 1, 24, dtype=dtype)
    fused = torch.randn(5, 100, generator=g).to(dtype)
    k, v = torch.randn(5, 1, 24, generator=g).to(dtype), fused[:, 40:64].view(5, 1, 24)
    slots = torch.tensor([3, 17, 63, 0, 40])
    want_k, want_v = k_cache.clone().index_copy_(0, slots, k), v_cache.clone().index_copy_(0, slots, v)
    assert kernels.native_write_kv(k_cache, v_cache, slots, k, v)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(IndexError, match="slot 64 outside"):
        kernels.native_write_kv(k_cache, v_cache, torch.tensor([1, 2, 3, 4, 64]), k, v)
    assert torch.equal(k_cache, want_k)                                       # nothing written
    fp8 = torch.zeros(64, 1, 24, dtype=torch.float8_e4m3fn)
    assert not kernels.native_write_kv(fp8, fp8.clone(), slots, k, v)
    assert not kernels.native_write_kv(k_cache, v_cache, slots, k.float() if dtype is torch.bfloat16 else k.bfloat16(), v)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 5, 768, 1003])                 # 0: an empty micro-batch; 1003: a vector tail
def test_residual_add_is_bitwise_torch_add(dtype, n, policy_restored):
    kernels.use_policy(kernels.decide_policy("auto", threads=1))
    g = torch.Generator().manual_seed(n)
    a, b = (torch.randn(n, generator=g) * 100).to(dtype), torch.randn(n, generator=g).to(dtype)
    if n:
        a[0], b[1] = float("inf"), float("nan")
    got, want = kernels.residual_add(a, b), a + b
    assert got.dtype is dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("renormalize", [False, True])
def test_native_route_equals_the_torch_route(dtype, renormalize, policy_restored):
    """Softmax in fp32 and top-k in one native call: the same weights as torch.softmax +
    torch.topk within a few fp32 ulp (libm's expf against torch's), for experts of the same logits
    in the same order; among equal logits (bf16 logits have ties) the lower expert id comes first,
    where torch's order is unspecified, so those are compared by their logits. No tokens, no work."""
    from afdserve.model.layers import route
    g = torch.Generator().manual_seed(int(renormalize))
    logits = (torch.randn(37, 48, generator=g) * 3).to(dtype)
    kernels.use_policy(kernels.decide_policy("torch"))
    want_w, want_ids = route(logits, 3, renormalize)
    kernels.use_policy(kernels.decide_policy("auto", threads=1))
    got = kernels.native_route(logits, 3, renormalize)
    assert got is not None
    w, ids = got
    assert w.dtype is torch.float32 and ids.dtype is torch.int64
    assert torch.equal(logits.gather(1, ids), logits.gather(1, want_ids))
    if dtype is torch.float32:                                    # no ties: the very same experts
        assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-6, atol=0)
    tied = torch.zeros(1, 8, dtype=dtype)
    tied[0, [2, 5, 6]] = 1.0
    assert kernels.native_route(tied, 2, renormalize)[1].tolist() == [[2, 5]]
    empty_w, empty_ids = kernels.native_route(logits[:0], 3, renormalize)
    assert empty_w.shape == (0, 3) and empty_ids.shape == (0, 3)
    assert kernels.native_route(logits, 49, renormalize) is None                 # more than there are: torch's error


@needs_native
def test_native_argmax_is_torch_argmax(policy_restored):
    """Greedy sampling's argmax: the first of equal maxima, the first NaN where a row has one,
    all -inf rows, a vector tail (13 columns) and rows read with a stride."""
    kernels.use_policy(kernels.decide_policy("auto", threads=2))
    g = torch.Generator().manual_seed(5)
    for cols in (13, 32000):
        x = torch.randn(70, cols + 3, generator=g)[:, 1:cols + 1]             # row stride cols + 3
        x[1, 2] = x[1, cols - 1] = x[1].max() + 1                               # a tie: the first
        x[2, cols // 2], x[2, cols - 1] = float("nan"), float("nan")          # NaN counts as largest
        x[3] = float("-inf")
        x[4, cols - 1] = float("inf")
        got = kernels.native_argmax(x)
        assert got is not None and got.dtype is torch.int64
        assert torch.equal(got, x.argmax(-1)), (got[:5], x.argmax(-1)[:5])
    assert kernels.native_argmax(torch.zeros(0, 5)).shape == (0,)
    assert kernels.native_argmax(torch.zeros(3, 5, dtype=torch.bfloat16)) is None   # torch's own
