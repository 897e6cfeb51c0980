"""Fast paths against slow references: paged MFA vs naive attention, MoE vs per-token loop."""
import math

import pytest
import torch

from afdserve.config import get_preset
from afdserve.model.attention import AttentionMetadata, KVCache, naive_attention, paged_attention
from afdserve.model.checkpoint import init_random
from afdserve.model.layers import MoE, RMSNorm, moe_reference, route
from afdserve.model.step3 import FFNShard, Step3ForCausalLM


def _paged_setup(ctx_lens, q_lens, g, d, bs=4, seed=0):
    """Random K/V for several sequences scattered over shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-c // bs) for c in ctx_lens) + 3
    perm = torch.randperm(nblocks, generator=gen).tolist()
    kv = KVCache(1, nblocks, bs, g, d, torch.float32)
    kv.k.normal_(generator=gen)
    kv.v.normal_(generator=gen)
    tables, used = [], 0
    for c in ctx_lens:
        n = -(-c // bs)
        tables.append(perm[used:used + n])
        used += n
    positions, slots = [], []
    for c, q, t in zip(ctx_lens, q_lens, tables):
        for p in range(c - q, c):
            positions.append(p)
            slots.append(t[p // bs] * bs + p % bs)
    meta = AttentionMetadata.build(positions, slots, q_lens, ctx_lens, tables, bs)
    return kv, meta, tables


@pytest.fixture(params=["native", "gathered"])
def decode_path(request, monkeypatch):
    """Decode attention through the native kernel (read in place from the paged cache; one torch
    thread, where built) and through the gather + SDPA path (its reference on every machine)."""
    from afdserve.model import kernels
    if request.param == "native":
        if not kernels.NATIVE:
            pytest.skip("afdserve._native is not built on this machine")
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(old))
    else:
        monkeypatch.setattr(kernels, "_policy", kernels.decide_policy("torch"))
    return request.param


@pytest.mark.parametrize("q_lens, ctx_lens, g", [
    ([1, 1, 1], [5, 9, 1], 1),       # decode batch, MFA (one KV head)
    ([3, 1, 6], [7, 4, 6], 1),       # mixed prefill chunks and decode
    ([1, 1], [8, 13], 2),            # GQA-style grouping still right
    ([1, 1, 1], [6, 6, 6], 1),       # equal contexts: the unmasked decode path
    ([4], [4], 2),
    ([40, 17], [40, 30], 2),         # a whole prompt (the fused causal kernel) beside a later chunk
])
def test_paged_attention_matches_naive(q_lens, ctx_lens, g, decode_path):
    nq, d = 4, 8
    kv, meta, tables = _paged_setup(ctx_lens, q_lens, g, d)
    q = torch.randn(sum(q_lens), nq, d, generator=torch.Generator().manual_seed(1))
    scale = 1 / math.sqrt(d)
    out = paged_attention(q, kv.k[0], kv.v[0], meta, scale)
    tok = 0
    for s, (nql, c) in enumerate(zip(q_lens, ctx_lens)):
        slots = meta.context_slots[s, :c]
        ref = naive_attention(q[tok:tok + nql], kv.k[0][slots], kv.v[0][slots], scale)
        torch.testing.assert_close(out[tok:tok + nql], ref, rtol=1e-5, atol=1e-5)
        tok += nql


def test_micro_batch_select_matches_whole():
    kv, meta, _ = _paged_setup([5, 9, 3, 7], [1, 1, 1, 1], 1, 8)
    q = torch.randn(4, 4, 8)
    full = paged_attention(q, kv.k[0], kv.v[0], meta, 0.3)
    part = paged_attention(q[1:3], kv.k[0], kv.v[0], meta.select(slice(1, 3)), 0.3)
    torch.testing.assert_close(part, full[1:3])


@pytest.mark.parametrize("nq, g, d, bs, ctx_lens, scale", [
    (16, 1, 128, 16, [1, 16, 17, 130, 300], 0.088),     # the small preset's MFA, block edges
    (64, 1, 256, 16, [40, 97], 0.0625),                 # Step-3's MFA: 64 heads x 256, one KV head
    (6, 2, 12, 3, [1, 2, 3, 4, 29], 0.3),               # 2 KV heads, 3 heads each, odd sizes
    (4, 1, 8, 4, [9, 13], 40.0),                        # peaked softmax: exp arguments below -87
])
def test_decode_attention_paths_match_naive_on_model_shapes(nq, g, d, bs, ctx_lens, scale, decode_path):
    kv, meta, tables = _paged_setup(ctx_lens, [1] * len(ctx_lens), g, d, bs=bs, seed=nq)
    # some runs of consecutive blocks (read as one span by the native kernel), some scattered
    q = torch.randn(len(ctx_lens), nq, d, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = paged_attention(q, kv.k[0], kv.v[0], meta, scale)
    for s, c in enumerate(ctx_lens):
        slots = meta.context_slots[s, :c]
        want = naive_attention(q[s:s + 1], kv.k[0][slots], kv.v[0][slots], scale)
        torch.testing.assert_close(out[s:s + 1], want, rtol=2e-5, atol=2e-5)


def test_native_decode_attention_reads_consecutive_and_scattered_blocks_alike():
    from afdserve.model import kernels
    if not kernels.NATIVE:
        pytest.skip("afdserve._native is not built on this machine")
    gen = torch.Generator().manual_seed(5)
    bs, nblocks, d = 4, 12, 16
    k, v = torch.randn(nblocks * bs, 1, d, generator=gen), torch.randn(nblocks * bs, 1, d, generator=gen)
    q = torch.randn(1, 8, d, generator=gen)
    ctx = 22                                                  # 6 blocks, the last one partly used
    with torch.inference_mode():
        runs = kernels.native_decode_attention(q, k, v, torch.tensor([[2, 3, 4, 5, 6, 7]]), [ctx], bs, 0.25)
    slots = torch.arange(2 * bs, 2 * bs + ctx)
    want = naive_attention(q, k[slots], v[slots], 0.25)
    torch.testing.assert_close(runs, want, rtol=1e-5, atol=1e-5)
    # the same K/V moved to scattered blocks (two short runs, two single blocks) gives the same answer
    perm = [9, 10, 0, 3, 4, 11]
    k2, v2 = torch.zeros_like(k), torch.zeros_like(v)
    for j, b in enumerate(perm):
        k2[b * bs:(b + 1) * bs] = k[(2 + j) * bs:(3 + j) * bs]
        v2[b * bs:(b + 1) * bs] = v[(2 + j) * bs:(3 + j) * bs]
    with torch.inference_mode():
        scattered = kernels.native_decode_attention(q, k2, v2, torch.tensor([perm]), [ctx], bs, 0.25)
    torch.testing.assert_close(scattered, want, rtol=1e-5, atol=1e-5)


def test_native_decode_attention_refuses_tables_outside_the_cache():
    from afdserve.model import kernels
    if not kernels.NATIVE:
        pytest.skip("afdserve._native is not built on this machine")
    k = v = torch.zeros(8 * 4, 1, 8)
    q = torch.zeros(2, 4, 8)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="block 1 is 8"):
            kernels.native_decode_attention(q, k, v, torch.tensor([[0, 1], [2, 8]]), [5, 6], 4, 1.0)
        with pytest.raises(ValueError, match="context 9"):
            kernels.native_decode_attention(q, k, v, torch.tensor([[0, 1], [2, 3]]), [5, 9], 4, 1.0)
        with pytest.raises(ValueError, match="disagree"):
            kernels.native_decode_attention(q, k, v, torch.tensor([[0, 1]]), [5, 6], 4, 1.0)
        assert kernels.native_decode_attention(q[:0], k, v, torch.zeros(0, 2, dtype=torch.int64), [], 4,
                                               1.0).shape == (0, 4, 8)          # no sequences: nothing to do
        with pytest.raises(ValueError, match="nq % g"):
            kernels.native_decode_attention(torch.zeros(2, 3, 8), torch.zeros(32, 2, 8), torch.zeros(32, 2, 8),
                                            torch.tensor([[0, 1], [2, 3]]), [5, 6], 4, 1.0)


def test_decode_gather_reuses_its_buffer_and_stays_exact_across_sizes(monkeypatch):
    from afdserve.model import attention, kernels
    monkeypatch.setattr(kernels, "_policy", kernels.decide_policy("torch"))  # the gather path
    ptrs = []
    for ctx_lens in ([5, 9, 3], [30, 2, 17, 8], [4, 4], [30, 2, 17, 8]):
        kv, meta, _ = _paged_setup(ctx_lens, [1] * len(ctx_lens), 1, 8)
        q = torch.randn(len(ctx_lens), 4, 8, generator=torch.Generator().manual_seed(len(ctx_lens)))
        with torch.inference_mode():
            out = paged_attention(q, kv.k[0], kv.v[0], meta, 0.3)
        ptrs.append(attention._workspace.buffers[("k", torch.float32, kv.k.device)].data_ptr())
        for s, c in enumerate(ctx_lens):
            slots = meta.context_slots[s, :c]
            want = naive_attention(q[s:s + 1], kv.k[0][slots], kv.v[0][slots], 0.3)
            torch.testing.assert_close(out[s:s + 1], want, rtol=1e-5, atol=1e-5)
    assert ptrs[1] == ptrs[2] == ptrs[3]          # grown once for the largest step, then kept


def test_rmsnorm_fp32_then_cast():
    n = RMSNorm(4, 1e-5)
    n.weight.data = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    torch.testing.assert_close(n(x), torch.tensor([[1.0, -2.0, 3.0, -4.0]]) / math.sqrt(1 + 1e-5))
    nb = RMSNorm(4, 1e-5).to(torch.bfloat16)
    nb.weight.data = n.weight.data.bfloat16()
    yb = nb(x.bfloat16())
    assert yb.dtype == torch.bfloat16                       # cast back to the input dtype
    torch.testing.assert_close(yb.float(), n(x), rtol=1e-2, atol=1e-2)
    # bf16 inputs that are not round numbers: normalised in fp32, then two bf16 roundings (the
    # cast, then the product with the weight), each within u = 2^-8 relative (half of bf16's ulp
    # at 8 significant bits): |yb - y| <= ((1 + u)^2 - 1) |y| ~ 2u |y| against the fp32 result.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 64, generator=g) * 3).bfloat16()
    w = (torch.rand(64, generator=g) + 0.5).bfloat16()
    n, nb = RMSNorm(64, 1e-5), RMSNorm(64, 1e-5).to(torch.bfloat16)
    n.weight.data, nb.weight.data = w.float(), w
    y, yb = n(x.float()), nb(x).float()
    u = 2.0 ** -8
    assert ((yb - y).abs() <= ((1 + u) ** 2 - 1) * y.abs() + 1e-7).all()
    # and exactly the fp32 normalisation cast once, times the weight in bf16 (not bf16 arithmetic)
    xf = x.float()
    assert torch.equal(nb(x), (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16() * w)


def test_moe_hand_set_weights_known_answer():
    # H = 1, width 1: expert e computes (e + 1) * silu(x) * x. Router logits are (0, 1, 2, 3) * x.
    moe = MoE(1, 1, 4, top_k=2, renormalize=False)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
        moe.gate_proj.weight.fill_(1.0)
        moe.up_proj.weight.fill_(1.0)
        moe.down_proj.weight.copy_(torch.arange(1.0, 5.0).view(4, 1, 1))
    x = torch.tensor([[1.0]])
    w, ids = moe.route(x)
    probs = torch.softmax(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0)
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(w, probs[[3, 2]].view(1, 2))   # no renormalisation by default
    silu_x_x = 1.0 / (1 + math.exp(-1.0))
    want = (probs[3] * 4 + probs[2] * 3) * silu_x_x
    torch.testing.assert_close(moe(x, w, ids), torch.tensor([[float(want)]]))
    w2, _ = route(moe.gate(x), 2, renormalize=True)
    torch.testing.assert_close(w2.sum(-1), torch.ones(1))


def _random_moe_and_routing(seed: int, tokens: int):
    """A 6-expert top-3 MoE with N(0, 0.3) weights, `tokens` random inputs and their routing."""
    torch.manual_seed(seed)
    moe = MoE(16, 8, 6, top_k=3, renormalize=False)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(tokens, 16)
    return moe, x, *moe.route(x)


def test_moe_fast_matches_reference_and_router_is_fp32():
    moe, x, w, ids = _random_moe_and_routing(0, 11)
    assert w.dtype == torch.float32
    torch.testing.assert_close(moe(x, w, ids), moe_reference(x, w, ids, moe), rtol=1e-5, atol=1e-6)
    mb = moe.to(torch.bfloat16)
    wb, _ = mb.route(x.bfloat16())
    assert wb.dtype == torch.float32


def test_moe_single_token_path_equals_the_batched_one_including_shards():
    full, x, w, ids = _random_moe_and_routing(1, 7)
    for first, stop in ((0, 6), (2, 5), (5, 6)):           # whole, a middle shard, a last one
        part = MoE(16, 8, 6, top_k=3, renormalize=False, router=False, experts=(first, stop))
        with torch.no_grad():
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(part, name).weight.copy_(getattr(full, name).weight[first:stop])
        batched = part(x, w, ids)
        for t in range(7):
            one = part(x[t:t + 1], w[t:t + 1], ids[t:t + 1])
            torch.testing.assert_close(one, batched[t:t + 1], rtol=1e-5, atol=1e-6)
    none_local = ids[:1].clone().fill_(0)                  # no slot on experts [5, 6)
    torch.testing.assert_close(part(x[:1], w[:1], none_local), torch.zeros(1, 16))


@pytest.mark.parametrize("world", [2, 3])
def test_ffn_shards_sum_to_full_ffn(world):
    config = get_preset("tiny")
    full = init_random(Step3ForCausalLM(config), seed=1)
    state = dict(full.named_parameters())
    x = torch.randn(5, config.hidden_size)
    for layer_id in (0, 1):   # a dense layer and a MoE layer
        inp = full.layers[layer_id].ffn_input(x)
        want = full.layers[layer_id].ffn_half(inp)
        total = torch.zeros_like(want)
        for r in range(world):
            shard = Step3ForCausalLM(config, role="ffn", shard=FFNShard(r, world))
            slices = shard.shard_slices()
            with torch.no_grad():
                for name, p in shard.named_parameters():
                    src = state[name]
                    if name in slices:
                        dim, a, b = slices[name]
                        src = src.narrow(dim, a, b - a)
                    p.copy_(src)
            total += shard.layers[layer_id].ffn_half(inp)
        torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)


def test_roles_hold_only_their_weights():
    config = get_preset("tiny")
    attn = {n for n, _ in Step3ForCausalLM(config, role="attention").named_parameters()}
    ffn = {n for n, _ in Step3ForCausalLM(config, role="ffn").named_parameters()}
    full = {n for n, _ in Step3ForCausalLM(config).named_parameters()}
    assert not attn & ffn and attn | ffn == full
    assert "model.layers.1.moe.gate.weight" in attn and "lm_head.weight" in attn
    assert "model.layers.1.moe.gate_proj.weight" in ffn and "model.layers.0.mlp.up_proj.weight" in ffn
