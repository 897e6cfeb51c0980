"""Block-scaled FP8 weights: e4m3 decoding, block dequantization, the native GEMM, FP8 checkpoints
(written, loaded, quantized at load, stacked and per-expert, sharded, malformed) and the engine
and AFD paths over them. Bounds are derived in each test from e4m3's precision (3 mantissa bits:
rounding error at most 2^-4 of the value for normals, 2^-10 of the block scale for subnormals)
or from fp32 summation order."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from afdserve.config import ConfigError, Step3Config, get_preset
from afdserve.model import fp8
from afdserve.model.attention import AttentionMetadata, KVCache
from afdserve.model.checkpoint import Fp8CheckpointError, init_random, load_model, save_checkpoint
from afdserve.model.fp8 import BLOCK, FP8, ConcatWeight, Fp8Weight, quantize
from afdserve.model.kernels import prepare_for_decode
from afdserve.model.step3 import FFNShard, Step3ForCausalLM

native = pytest.mark.skipif(fp8._NATIVE is None, reason="afdserve._fp8 not built or CPU without AVX2/F16C")
FINITE = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F])
EPS32 = 2.0 ** -24


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The same random tiny model written in fp32 and as FP8 (the other tensors in fp32)."""
    root = tmp_path_factory.mktemp("fp8")
    model = init_random(Step3ForCausalLM(get_preset("tiny")), seed=0)
    return {"fp32": save_checkpoint(model, root / "fp32"),
            "fp8": save_checkpoint(model, root / "fp8", "float32", quantization="fp8")}


def _fp8_weights(model):
    return {f"{mn}.{k}": v for mn, m in model.named_modules() for k, v in vars(m).items() if isinstance(v, Fp8Weight)}


def _run(model, ids, decode=3, bs=8):
    """Logits of the last prompt token and of `decode` tokens decoded one at a time (native path)."""
    c, n = model.config, len(ids)
    nb = -(-n // bs)
    kv = KVCache(c.num_hidden_layers, nb, bs, c.num_attention_groups, c.head_dim, torch.float32)
    t, p, table = torch.tensor(ids), n - decode, [list(range(nb))]
    out = []
    with torch.inference_mode():
        h = model(t[:p], AttentionMetadata.build(list(range(p)), list(range(p)), [p], [p], table, bs), kv)
        out.append(model.logits(h[-1:]))
        for i in range(p, n):
            h = model(t[i:i + 1], AttentionMetadata.build([i], [i], [1], [i + 1], table, bs), kv)
            out.append(model.logits(h))
    return torch.cat(out)


def _slow_dequantize(w: Fp8Weight) -> torch.Tensor:
    """Block by block with the bit-field decoding table (no torch float8 conversion)."""
    table, (n, k) = fp8.e4m3_values(), w.shape
    out = torch.empty(n, k)
    for i in range(n):
        for j0 in range(0, k, 7):
            j = torch.arange(j0, min(k, j0 + 7))
            s = w.scale[(i + w.row_offset) // w.row_block, (j + w.col_offset) // BLOCK]
            out[i, j] = table[w.codes[i, j].long()] * s
    return out


# ------------------------------------------------------------------ codes and blocks
def test_e4m3_table_equals_torch_conversion_for_all_256_codes():
    ours = fp8.e4m3_values()
    torch_ = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    assert torch.equal(torch.isnan(ours), torch.isnan(torch_)) and torch.isnan(ours).sum() == 2
    assert torch.equal(ours[FINITE], torch_[FINITE])


@native
@pytest.mark.parametrize("col", [0, 21, 33])      # vector body (two 16-wide chunks) and the scalar tail
def test_native_gemm_decodes_every_finite_code_like_torch(col):
    codes = torch.zeros(256, 35, dtype=torch.uint8)
    codes[:, col] = torch.arange(256, dtype=torch.uint8)
    scale = torch.tensor([[0.5], [2.0]])                               # two row blocks of 128
    w = Fp8Weight(codes, scale)
    x = torch.zeros(1, 35)
    x[0, col] = 1.0
    y = fp8.native_linear(x, w)[0]
    want = torch.arange(256, dtype=torch.uint8).view(FP8).float() * scale.repeat_interleave(128, 0)[:, 0]
    assert torch.equal(y[FINITE], want[FINITE])


@pytest.mark.parametrize("shape", [(5, 7), (128, 128), (300, 200), (2, 129, 260)])
def test_quantize_error_within_half_step_and_dequantize_matches_slow_reference(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])          # several decades per block
    q = quantize(w)
    assert q.scale.shape == (*shape[:-2], -(-shape[-2] // BLOCK), -(-shape[-1] // BLOCK))
    deq = q.dequantize_torch()
    s = q.scale.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., :shape[-2], :shape[-1]]
    assert ((deq - w).abs() <= torch.maximum(2.0 ** -4 * w.abs(), 2.0 ** -10 * s)).all()
    for e in range(shape[0] if len(shape) == 3 else 1):
        m = q[e] if len(shape) == 3 else q
        ref = _slow_dequantize(m)
        assert torch.equal(m.dequantize(), ref) and torch.equal(m.dequantize_torch(), ref)


def test_row_and_column_slices_keep_the_block_grid():
    torch.manual_seed(1)
    q = quantize(torch.randn(300, 270))
    full = q.dequantize()
    for (a, b), (c, d) in [((0, 300), (0, 270)), ((5, 133), (64, 200)), ((130, 299), (127, 129)), ((256, 300), (3, 4))]:
        part = q.rows(a, b).cols(c, d)
        assert torch.equal(part.dequantize(), full[a:b, c:d])
        assert torch.equal(_slow_dequantize(part), full[a:b, c:d])
        assert torch.equal(part.rows(1, 2).dequantize(), full[a + 1:a + 2, c:d])


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 17, 40])
@pytest.mark.parametrize("dtype,col0", [(torch.float32, 70), (torch.bfloat16, 70), (torch.bfloat16, 0)])
def test_fp8_gemm_equals_dequantize_then_linear(rows, dtype, col0):
    """Both products see the same dequantized numbers; they differ by fp32 summation order only:
    |error| <= 2 K eps32 (|x| @ |W|^T). In bf16 add the rounding of the result and, on the many-row
    path (a bf16 tile of W for torch's matmul), of the weights: 2^-8 |y| + 2^-8 (|x| @ |W|^T)."""
    torch.manual_seed(rows)
    K = 333
    q = quantize(torch.randn(259, 600)).rows(3, 259).cols(col0, col0 + K)    # offsets on both axes
    x = torch.randn(rows, K).to(dtype)
    W = q.dequantize()
    ref = F.linear(x.float(), W)
    y = q.linear(x)
    assert y.dtype == dtype and y.shape == (rows, 256)
    bound = 2 * K * EPS32 * F.linear(x.float().abs(), W.abs())
    if dtype is torch.bfloat16:
        bound = bound + 2.0 ** -8 * ref.abs() + 2.0 ** -8 * F.linear(x.float().abs(), W.abs())
    assert ((y.float() - ref).abs() <= bound + 1e-30).all()
    assert torch.equal(F.linear(x, q), y)                                      # torch's F.linear lands here too
    assert torch.equal(q.linear(x.unsqueeze(0))[0], y)


@pytest.mark.skipif(not fp8.NATIVE_BF16, reason="no AVX512-BF16 + VBMI on this CPU")
def test_bf16_kernel_equals_the_avx2_kernel_to_summation_order(monkeypatch):
    """bf16 activations: the AVX512-BF16 kernel (codes widened to bf16, exact) and the AVX2 one
    (codes widened to fp32) multiply the same numbers; K = 700 has a 60-column scalar tail."""
    torch.manual_seed(6)
    q, x = quantize(torch.randn(300, 700)).rows(5, 300), torch.randn(3, 700).bfloat16()
    fast = q.linear(x).float()
    monkeypatch.setattr(fp8, "NATIVE_BF16", False)
    avx2 = q.linear(x).float()
    bound = 2 * 700 * EPS32 * F.linear(x.float().abs(), q.dequantize().abs()) + 2.0 ** -8 * avx2.abs()
    assert ((fast - avx2).abs() <= bound).all()


def test_without_native_kernel_the_torch_path_gives_the_same_products(monkeypatch):
    torch.manual_seed(2)
    q, x = quantize(torch.randn(200, 300)), torch.randn(3, 300)
    fast = q.linear(x)
    monkeypatch.setattr(fp8, "_NATIVE", None)
    slow = q.linear(x)
    assert torch.allclose(fast, slow, rtol=0, atol=2 * 300 * EPS32 * float((x.abs() @ q.dequantize().abs().t()).max()))


def test_fused_rows_share_one_grid_when_block_aligned():
    torch.manual_seed(3)
    parts = [quantize(torch.randn(n, 200)) for n in (256, 128, 128)]
    x = torch.randn(2, 200)
    fused = torch.cat(parts, dim=-2)
    assert isinstance(fused, Fp8Weight) and fused.shape == (512, 200)
    assert torch.allclose(fused.linear(x), torch.cat([p.linear(x) for p in parts], -1), rtol=0, atol=1e-5)
    odd = torch.cat([quantize(torch.randn(n, 200)) for n in (32, 16)], dim=-2)   # not aligned: kept apart
    assert isinstance(odd, ConcatWeight) and odd.shape == (48, 200)


# ------------------------------------------------------------------ checkpoints
def test_fp8_checkpoint_format(ckpts):
    t = load_file(str(ckpts["fp8"] / "model.safetensors"))
    cfg = json.loads((ckpts["fp8"] / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                          "activation_scheme": "dynamic", "modules_to_not_convert": []}
    assert t["model.layers.1.moe.gate_proj.weight"].dtype == FP8
    assert t["model.layers.1.moe.gate_proj.weight_scale_inv"].shape == (4, 1, 1)
    assert t["model.layers.0.self_attn.o_proj.weight"].dtype == FP8
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.moe.gate.weight",
                 "model.norm.weight", "model.layers.0.self_attn.inter_norm.weight"):
        assert t[kept].dtype == torch.float32 and kept + "_scale_inv" not in t


def test_fp8_model_logits_within_e4m3_bound_of_fp32(ckpts):
    """Every quantized weight is off by at most 2^-4 of itself, so each quantized product is off by
    at most 2^-4 of |x| @ |W|^T; with the 5 quantized products a token passes per layer (qkv, wq,
    o, gate/up, down) the logits' rms error must stay below 2^-4 * sqrt(5 * layers) of their rms."""
    ref_model, model = load_model(ckpts["fp32"]), load_model(ckpts["fp8"])
    # 4 layers x 5 attention weights, 2 dense FFNs x 3, 2 MoE layers x (3 stacked + 3 shared expert)
    assert len(_fp8_weights(model)) == 4 * 5 + 2 * 3 + 2 * 6
    ids = list(range(3, 40))
    ref, got = _run(ref_model, ids), _run(model, ids)
    rel = (got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    print(f"fp8 vs fp32 logits: rms error {rel:.4f} of rms, max abs {(got - ref).abs().max():.4f}")
    assert 0 < rel < 2.0 ** -4 * (5 * 4) ** 0.5
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5


def test_quantize_at_load_equals_the_written_fp8_checkpoint(ckpts):
    written, at_load = load_model(ckpts["fp8"]), load_model(ckpts["fp32"], quantization="fp8")
    a, b = _fp8_weights(written), _fp8_weights(at_load)
    assert set(a) == set(b) and a
    for name in a:
        assert torch.equal(a[name].codes, b[name].codes) and torch.equal(a[name].scale, b[name].scale), name
    for (n1, p1), (n2, p2) in zip(written.named_parameters(), at_load.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    ids = list(range(5, 30))
    assert torch.allclose(_run(written, ids), _run(at_load, ids), rtol=0, atol=1e-4)


def test_prepare_for_decode_fuses_fp8_weights_without_changing_logits(ckpts):
    model = load_model(ckpts["fp8"])
    ids = list(range(3, 30))
    before = _run(model, ids)
    prepare_for_decode(model)
    assert model.layers[0].mlp.gate_up is not None and model.layers[1].moe.gate_up is not None
    assert torch.allclose(_run(model, ids), before, rtol=0, atol=1e-4)


def test_per_expert_fp8_layout_loads_like_stacked(ckpts, tmp_path):
    dst = shutil.copytree(ckpts["fp8"], tmp_path / "per_expert")
    t = load_file(str(dst / "model.safetensors"))
    for name in [n for n in t if ".moe." in n and "_proj.weight" in n and not n.endswith("_scale_inv")]:
        base, proj = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
        codes, scales = t.pop(name), t.pop(name + "_scale_inv")
        for e in range(codes.shape[0]):
            t[f"{base}.experts.{e}.{proj}.weight"] = codes[e].contiguous()
            t[f"{base}.experts.{e}.{proj}.weight_scale_inv"] = scales[e].contiguous()
    save_file(t, str(dst / "model.safetensors"))
    a, b = _fp8_weights(load_model(ckpts["fp8"])), _fp8_weights(load_model(dst))
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name].codes, b[name].codes) and torch.equal(a[name].scale, b[name].scale), name
    shard = load_model(dst, role="ffn", shard=FFNShard(1, 2))            # experts 2-3 of 4
    assert torch.equal(shard.layers[1].moe.up_proj.weight.codes, a["model.layers.1.moe.up_proj.weight"].codes[2:])


@pytest.mark.parametrize("which", ["fp8", "fp32"])
def test_ffn_shards_of_fp8_weights_sum_to_the_whole(ckpts, which):
    """Shards slice the dense / shared-expert widths (64 of 128 columns of down_proj: inside one
    block) and the experts; each keeps the whole tensor's block grid, so the partial sums add up to
    the unsharded FP8 FFN (to fp32 summation order)."""
    kw = {"quantization": "fp8"} if which == "fp32" else {}
    full = load_model(ckpts[which], role="ffn", **kw)
    shards = [load_model(ckpts[which], role="ffn", shard=FFNShard(r, 2), **kw) for r in range(2)]
    down = shards[1].layers[0].mlp.down_proj.weight
    assert isinstance(down, Fp8Weight) and down.col_offset == 64
    torch.manual_seed(4)
    x = torch.randn(3, 64)
    w, ids = torch.softmax(torch.randn(3, 2), -1), torch.tensor([[0, 3], [1, 2], [3, 1]])
    from afdserve.model.step3 import FFNInput
    with torch.inference_mode():
        for i in range(4):
            inp = FFNInput(x, w, ids) if full.layers[i].is_moe else FFNInput(x)
            want = full.layers[i].ffn_half(inp)
            got = sum(s.layers[i].ffn_half(inp) for s in shards)
            assert torch.allclose(got, want, rtol=0, atol=1e-5), i


# ------------------------------------------------------------------ malformed checkpoints
def _broken(ckpts, tmp_path, edit, config_edit=None):
    dst = shutil.copytree(ckpts["fp8"], tmp_path / "broken")
    t = load_file(str(dst / "model.safetensors"))
    edit(t)
    save_file(t, str(dst / "model.safetensors"))
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


W = "model.layers.2.moe.down_proj.weight"


def _nan(t):
    c = t[W].view(torch.uint8).clone()
    c[1, 3, 5] = 0xFF
    t[W] = c.view(FP8)


@pytest.mark.parametrize("edit,config_edit,message", [
    (lambda t: t.pop(W + "_scale_inv"), None, f"FP8 tensor '{W}' has no block scales '{W}_scale_inv'"),
    (lambda t: t.update({W + "_scale_inv": torch.ones(4, 1, 2)}), None,
     rf"scale tensor '{W}_scale_inv' has shape \[4, 1, 2\], expected \[4, 1, 1\]"),
    (_nan, None, f"FP8 tensor '{W}' holds NaN codes"),
    (lambda t: t.update({"model.norm.weight_scale_inv": torch.ones(1)}), None,
     "'model.norm.weight_scale_inv' scales tensor 'model.norm.weight', which is F32"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight_scale_inv": torch.ones(1, 1)}), None,
     "scale tensor 'model.layers.0.mlp.extra.weight_scale_inv' has no weight"),
    (lambda t: t.update({W: t[W].float().to(torch.float8_e5m2)}), None, f"tensor '{W}' is F8_E5M2"),
    (lambda t: None, lambda c: c.pop("quantization_config"), "is FP8 but config.json has no quantization_config"),
])
def test_malformed_fp8_checkpoints_give_named_errors(ckpts, tmp_path, edit, config_edit, message):
    ckpt = _broken(ckpts, tmp_path, edit, config_edit)
    with pytest.raises(Fp8CheckpointError, match=message):
        load_model(ckpt)


@pytest.mark.parametrize("qc,message", [({"quant_method": "awq"}, "quant_method' is 'awq'"),
                                        ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "weight_block_size"),
                                        ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme"),
                                        ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt")])
def test_unsupported_quantization_configs_are_refused(qc, message):
    with pytest.raises(ConfigError, match=message):
        Step3Config.from_dict({**get_preset("tiny").to_dict(), "quantization_config": qc})


def test_modules_to_not_convert_stay_in_high_precision(ckpts, tmp_path):
    dst = shutil.copytree(ckpts["fp32"], tmp_path / "skip")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "modules_to_not_convert": ["self_attn.o_proj", "layers.3."]}
    (dst / "config.json").write_text(json.dumps(cfg))
    model = prepare_for_decode(load_model(dst, quantization="fp8"))
    names = set(_fp8_weights(model))
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("o_proj" in n or "layers.3." in n for n in names)
    assert torch.isfinite(_run(model, list(range(3, 20)))).all()


# ------------------------------------------------------------------ engine, CLI, AFD
def test_llm_serves_fp8_checkpoint_and_quantize_at_load_alike(ckpts, tmp_path):
    from afdserve import LLM, SamplingParams
    from afdserve.cli import main

    assert main(["init-checkpoint", "--preset", "tiny", "--out", str(tmp_path / "cli"), "--dtype", "fp8"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    outs = {}
    for key, ckpt, quant in [("written", ckpts["fp8"], None), ("at_load", ckpts["fp32"], "fp8"),
                             ("cli", tmp_path / "cli", None)]:
        with LLM(model=str(ckpt), device="cpu", quantization=quant, num_kv_blocks=32, block_size=4) as llm:
            assert isinstance(llm.engine.executor.runner.model.layers[0].self_attn.o_proj.weight, Fp8Weight)
            outs[key] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs["written"] == outs["at_load"] and all(len(t) == 6 for t in outs["cli"])


@native
def test_threads_split_the_rows_without_changing_results():
    """Large products run on torch's OpenMP threads, a block of rows each: every output is computed
    by the same instructions whatever the thread count, so the results are bitwise equal."""
    torch.manual_seed(5)
    q, x = quantize(torch.randn(1000, 700)), torch.randn(3, 700)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_deq = q.linear(x), q.dequantize()
        torch.set_num_threads(2)
        two, two_deq = q.linear(x), q.dequantize()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one_deq, two_deq)


def test_afd_1a1f_with_fp8_weights_equals_colocated_fp8(ckpts):
    """The FFN worker quantizes its experts at load like the colocated model (quantization passed to
    every worker), so 1A1F gives the colocated FP8 tokens and log-probabilities (to summation
    order), not the fp32 model's; 8-bit A->F transfer composes with FP8 weights."""
    from afdserve import LLM, SamplingParams

    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=0)

    def run(llm):
        outs = [o.outputs[0] for o in llm.generate(prompts, params)]
        return [c.token_ids for c in outs], torch.tensor([s.logprob for c in outs for s in c.logprobs])

    kw = {"device": "cpu", "num_kv_blocks": 64, "block_size": 4}
    with LLM(model=str(ckpts["fp8"]), **kw) as llm:
        want, want_lp = run(llm)
    with LLM(model=str(ckpts["fp32"]), **kw) as llm:
        _, fp32_lp = run(llm)
    with LLM(model=str(ckpts["fp32"]), afd="1A1F", quantization="fp8", micro_batches=2,
             afd_options={"timeout_s": 20.0, "threads_per_worker": 1}, **kw) as llm:
        got, got_lp = run(llm)
        assert got == want
        assert (got_lp - want_lp).abs().max() < 1e-4 < (fp32_lp - want_lp).abs().max()
        llm.engine.executor.set_a2f("8bit")
        got8, _ = run(llm)
        assert llm.engine.health() is None
    same = sum(a == b for g, w in zip(got8, want) for a, b in zip(g, w))
    assert same >= sum(map(len, want)) // 2, (got8, want)


@pytest.mark.parametrize("dtype,elem", [("bfloat16", 2), ("float32", 4)])
def test_bench_counts_fp8_weights_at_their_stored_bytes(ckpts, dtype, elem):
    """The decode bench's roofline counts what an FP8 model holds: the codes and scales of every
    Fp8Weight plus the high-precision tensors (norms, router, LM head) at the run's dtype, and of
    the embedding table only the rows a step reads. With every expert hit, a batch-1 step reads
    every weight once."""
    from afdserve.bench import decode
    model = load_model(ckpts["fp8"], dtype, quantization="fp8")
    c = model.config
    fp8_bytes = sum(w.nbytes for w in _fp8_weights(model).values())
    high = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert all(p.element_size() == elem for p in model.parameters())
    for batch in (1, 3):
        b = decode.step_bytes(c, batch, 0, elem, distinct_experts=c.moe_num_experts, quantization="fp8")
        assert b["weights"] == fp8_bytes + high + batch * c.hidden_size * elem
    unq = decode.step_bytes(c, 1, 0, elem, distinct_experts=c.moe_num_experts)
    assert unq["weights"] > decode.step_bytes(c, 1, 0, elem, c.moe_num_experts, "fp8")["weights"]
    r = {"batch": 1, "mean_context": 5.0, "step_s": 0.5, "distinct_experts": [2.0] * len(c.moe_layers_enum)}
    by = decode.step_bytes(c, 1, 5.0, elem, r["distinct_experts"], "fp8")["total"]
    assert decode.roofline(c, {**r, "quantization": "fp8"}, 1.0, 1.0, elem)["bytes_per_step"] == by
    assert decode.roofline(c, r, 1.0, 1.0, elem)["bytes_per_step"] > by


def _paths():
    """The native kernels this CPU can run: (name, activation dtype, use the AVX512-BF16 kernel)."""
    out = [("avx2-fp32x", torch.float32, False), ("avx2-bf16x", torch.bfloat16, False)]
    return out + ([("avx512bf16", torch.bfloat16, True)] if fp8.NATIVE_BF16 else [])


@native
@pytest.mark.parametrize("name,dtype,bf16", _paths())
def test_each_kernel_path_every_row_count_and_tail(monkeypatch, name, dtype, bf16):
    """Every kernel path forced, rows 1..16 (register groups of 1-4 rows and their repeats), K with
    and without a tail past the 64-/16-wide vectors and the 128-column blocks, N not a multiple of
    the 4-row tiles, a row offset into the block grid and a row block other than 128: equal to dequantize-then-matmul up to fp32 summation order (+ bf16 output rounding)."""
    monkeypatch.setattr(fp8, "NATIVE_BF16", bf16)
    torch.manual_seed(7)
    for K, N, row_block in [(64, 5, 128), (200, 130, 128), (773, 37, 50)]:
        full = quantize(torch.randn(N + 3, K))
        scale = torch.rand(-(-(N + 3) // row_block), full.scale.shape[1]) + 0.5
        q = Fp8Weight(full.codes, scale, row_block).rows(3, N + 3)
        W = q.dequantize()
        for rows in range(1, 17):
            x = torch.randn(rows, K).to(dtype)
            y = fp8.native_linear(x, q).float()
            ref = F.linear(x.float(), W)
            bound = 2 * K * EPS32 * F.linear(x.float().abs(), W.abs()) + (2.0 ** -8 * ref.abs() if dtype != torch.float32 else 0)
            assert ((y - ref).abs() <= bound + 1e-30).all(), (K, N, row_block, rows)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_split_without_changing_results_in_either_dtype(dtype):
    """Both kernels give bitwise the same products on one thread and on two (a 640-row product: five
    128-row blocks, split by scale rows / 4-row tiles)."""
    torch.manual_seed(8)
    q, x = quantize(torch.randn(640, 768)), torch.randn(5, 768).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [fp8.native_linear(x[:m], q) for m in (1, 2, 5)]
        torch.set_num_threads(2)
        two = [fp8.native_linear(x[:m], q) for m in (1, 2, 5)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@native
@pytest.mark.parametrize("name,dtype,bf16", _paths())
@pytest.mark.parametrize("col", [5, 70, 130])       # in the first / second 64-code chunk, the second 128-block
def test_every_finite_code_through_each_vector_path(monkeypatch, name, dtype, bf16, col):
    """Each of the 254 finite codes, in the vectorised body of every kernel path (K = 192: three
    64-code chunks, two 128-column blocks), times a one-hot x gives exactly code value x scale
    (e4m3 values have 4 significant bits: exact in bf16 too)."""
    monkeypatch.setattr(fp8, "NATIVE_BF16", bf16)
    codes = torch.zeros(256, 192, dtype=torch.uint8)
    codes[:, col] = torch.arange(256, dtype=torch.uint8)
    scale = torch.tensor([[0.5, 4.0], [2.0, 0.25]])                      # two row blocks x two column blocks
    x = torch.zeros(1, 192, dtype=dtype)
    x[0, col] = 1.0
    y = fp8.native_linear(x, Fp8Weight(codes, scale))[0].float()
    want = torch.arange(256, dtype=torch.uint8).view(FP8).float() * scale[:, col // 128].repeat_interleave(128)
    assert torch.equal(y[FINITE], want[FINITE])


def test_bench_profiles_the_quantized_model_it_measures(tmp_path, monkeypatch):
    """`afdserve bench --quantization fp8` profiles the FP8 model, not the unquantized one."""
    import argparse
    from afdserve.bench import cli, decode
    seen = []
    monkeypatch.setattr(decode, "measure_decode",
                        lambda *a, **kw: seen.append(kw.get("quantization")) or {"profile": "p", "step_s": 1.0})
    args = argparse.Namespace(batches=[1], contexts=[16], afd_batch=2, steps=2, warmup=1, device="cpu",
                              dtype="float32", quantization="fp8", kv_cache_dtype="auto")
    cli._profile(args, tmp_path, lambda m: None, tmp_path)
    assert seen and all(q == "fp8" for q in seen)


@pytest.mark.skipif(not fp8.NATIVE_BF16, reason="no AVX512-BF16 + VBMI on this CPU")
@pytest.mark.parametrize("threads", [1, 2])                   # 2: whole experts per thread
def test_native_moe_over_fp8_experts_is_bitwise_the_python_moe(monkeypatch, threads):
    """moe.c with FP8 experts (afdserve._fp8's GEMM by address) and an FP8 shared expert: bit for
    bit MoE.forward + share_expert on the same weights, a local slice of the experts and a shard of
    the shared expert included. Above fp8.NATIVE_MAX_ROWS rows (where
    the Python path dequantizes instead) the call declines."""
    from afdserve.model import kernels, layers
    from afdserve.model.checkpoint import _set_quantized
    from afdserve.model.layers import MoE, SwiGLU, route
    monkeypatch.setattr(kernels, "_policy", kernels.decide_policy("auto", threads))
    g = torch.Generator().manual_seed(5)
    moe, shared = MoE(256, 128, 8, 3, False, experts=(2, 7)), SwiGLU(256, 256)
    for mod in (moe, shared):
        for name, p in list(mod.named_parameters()):
            _set_quantized(mod, name, quantize(torch.randn(p.shape, generator=g) * 0.05))
    shared.gate_proj.weight = shared.gate_proj.weight.rows(128, 256)     # FFN shard 1 of 2
    shared.up_proj.weight = shared.up_proj.weight.rows(128, 256)
    shared.down_proj.weight = shared.down_proj.weight.cols(128, 256)
    prepare_for_decode(moe)
    prepare_for_decode(shared)
    assert isinstance(moe.gate_up, Fp8Weight) and isinstance(shared.gate_up, Fp8Weight)
    with torch.no_grad():
        for T in (1, 3, 16):
            x = torch.randn(T, 256, generator=g).bfloat16()
            w, ids = route(torch.randn(T, 8, generator=g), 3, False)
            pair = (shared.gate_up, shared.down_proj.weight)
            fused = kernels.native_moe(x, w, ids, moe.gate_up, moe.down_proj.weight, moe.first, pair)
            with monkeypatch.context() as m:
                m.setattr(layers, "native_moe", lambda *a: None)
                python = moe(x, w, ids) + shared(x)
            assert fused is not None and torch.equal(fused, python), T
        x = torch.randn(17, 256, generator=g).bfloat16()
        w, ids = route(torch.randn(17, 8, generator=g), 3, False)
        assert kernels.native_moe(x, w, ids, moe.gate_up, moe.down_proj.weight, moe.first, pair) is None
