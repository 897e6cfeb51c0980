"""The decode kernels and weight layouts equal the plain F.linear / unprepared model."""
from __future__ import annotations

import copy
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from afdserve.config import get_preset
from afdserve.model import kernels
from afdserve.model.attention import AttentionMetadata, KVCache
from afdserve.model.checkpoint import init_random
from afdserve.model.kernels import is_transposed, linear, prepack, prepare_for_decode
from afdserve.model.step3 import FFNShard, Step3ForCausalLM


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request):
    """Run under 1 torch thread (OpenBLAS eligible) and 2 (MKL / oneDNN only); restore after."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.fixture(params=["native", "blas"])
def kernel_set(request, monkeypatch):
    """With the native kernels (where built) and with the BLAS libraries only."""
    if request.param == "native" and not kernels.NATIVE:
        pytest.skip("afdserve._native is not built on this machine")
    if request.param == "blas":
        monkeypatch.setattr(kernels, "NATIVE", False)
    return request.param


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8, 9, 33])
@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_linear_equals_f_linear_for_every_layout(rows, shape, torch_threads, kernel_set):
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
    monkeypatch.setattr(kernels, "NATIVE", False)
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
    native, blas = [], []
    real_native, real_blas = kernels._native_call, kernels._openblas_linear
    monkeypatch.setattr(kernels, "_native_call", lambda x, w, *a: native.append(x.shape[0]) or real_native(x, w, *a))
    monkeypatch.setattr(kernels, "_openblas_linear", lambda x, w: blas.append(x.shape[0]) or real_blas(x, w))
    wt = torch.randn(64, 32).t().contiguous().t()          # transposed storage
    w = torch.randn(32, 64)                                 # checkpoint layout
    sliced = torch.randn(40, 64)[4:36]                      # rows of a fused matrix: still eligible
    for rows in (1, 2, 8, 9, 32, 33):
        linear(torch.randn(rows, 32), wt)
        linear(torch.randn(rows, 64), w)
        linear(torch.randn(rows, 64), sliced)
    if torch_threads == 1:
        assert native == [1, 1, 1, 2, 2, 2, 8, 8, 8, 9, 9, 32, 32]
        assert blas == ([9, 32, 33, 33, 33] if kernels.OPENBLAS else [])
    else:
        assert native == [] and blas == []
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


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("cc") is None or
                    not {"avx2", "fma"} <= _cpu_flags(),
                    reason="needs an x86-64 CPU with AVX2/FMA and a C compiler")
def test_native_kernels_are_built_where_they_can_run():
    """The install compiles afdserve._native when a compiler is present (setup.py, optional so a
    machine without one still installs); here one is, so a silent build failure is an error."""
    assert kernels.NATIVE


def _storages(model):
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}


def _run(model, ids, positions, kv_seed=0):
    c = model.config
    S = len(ids)
    kv = KVCache(c.num_hidden_layers, 4 * S + 1, 4, c.num_attention_groups, c.head_dim, torch.float32)
    gen = torch.Generator().manual_seed(kv_seed)
    kv.k.copy_(torch.randn(kv.k.shape, generator=gen))
    kv.v.copy_(torch.randn(kv.v.shape, generator=gen))
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
