"""Loading real-format checkpoints: round trip, sharded, per-expert, VL, and every malformed case."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from afdserve.config import get_preset
from afdserve.model.checkpoint import CheckpointError, load_model
from afdserve.model.step3 import FFNShard


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _tensors(ckpt):
    return load_file(str(ckpt / "model.safetensors"))


def _rewrite(ckpt, tensors):
    save_file(tensors, str(ckpt / "model.safetensors"))


def test_round_trip_equal(tiny_ckpt):
    model = load_model(tiny_ckpt)
    want = _tensors(tiny_ckpt)
    got = dict(model.named_parameters())
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_bfloat16_load(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_loading_does_not_hold_two_copies(tmp_path):
    # A checkpoint of ~100 MB (large vocabulary) loaded in a fresh process: peak RSS growth must
    # stay well under two copies of the weights.
    import subprocess
    import sys

    from afdserve.model.checkpoint import init_checkpoint

    ckpt = init_checkpoint(get_preset("tiny").replace(vocab_size=200_000), tmp_path / "big")
    size = (ckpt / "model.safetensors").stat().st_size
    code = (
        "import resource, torch, sys\n"
        "from afdserve.model.checkpoint import load_model\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"m = load_model({str(ckpt)!r})\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) * 1024)\n")
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown < 1.5 * size, (grown, size)


def test_sharded_with_index_and_per_expert_names(tiny_ckpt, tmp_path):
    want = _tensors(tiny_ckpt)
    ckpt = tmp_path / "sharded"
    ckpt.mkdir()
    shutil.copy(tiny_ckpt / "config.json", ckpt / "config.json")
    split = {}
    for name, t in want.items():
        if name.endswith(("moe.gate_proj.weight", "moe.up_proj.weight", "moe.down_proj.weight")):
            base, kind, _ = name.rsplit(".", 2)
            for e in range(t.shape[0]):
                split[f"{base}.experts.{e}.{kind}.weight"] = t[e].clone()
        else:
            split[name] = t
    names = sorted(split)
    half = len(names) // 2
    files = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in files.items():
        save_file({k: split[k] for k in keys}, str(ckpt / fname))
        weight_map.update({k: fname for k in keys})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = dict(load_model(ckpt).named_parameters())
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_vl_checkpoint_skips_vision_tensors(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    text = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({"model_type": "step3_vl", "text_config": text,
                                                  "vision_config": {"width": 4}}))
    t = _tensors(ckpt)
    t["vision_model.conv.weight"] = torch.zeros(2, 2)
    t["vit_large_projector.weight"] = torch.zeros(3)
    _rewrite(ckpt, t)
    model = load_model(ckpt)
    got = dict(model.named_parameters())
    want = _tensors(tiny_ckpt)                   # the text model's tensors, every one loaded as written
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    assert model.config.hidden_size == text["hidden_size"]


def test_ffn_shard_loads_slices(tiny_ckpt):
    shard = load_model(tiny_ckpt, role="ffn", shard=FFNShard(1, 2))
    full = _tensors(tiny_ckpt)
    p = dict(shard.named_parameters())
    assert torch.equal(p["model.layers.1.moe.gate_proj.weight"], full["model.layers.1.moe.gate_proj.weight"][2:4])
    assert torch.equal(p["model.layers.0.mlp.down_proj.weight"], full["model.layers.0.mlp.down_proj.weight"][:, 64:])
    assert "lm_head.weight" not in p


def test_missing_tensor(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    t = _tensors(ckpt)
    del t["model.layers.2.self_attn.wq.weight"]
    _rewrite(ckpt, t)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.self_attn\.wq\.weight'"):
        load_model(ckpt)


def test_missing_expert(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    t = _tensors(ckpt)
    stacked = t.pop("model.layers.1.moe.up_proj.weight")
    for e in (0, 1, 3):
        t[f"model.layers.1.moe.experts.{e}.up_proj.weight"] = stacked[e].clone()
    _rewrite(ckpt, t)
    with pytest.raises(CheckpointError, match=r"experts\.2\.up_proj"):
        load_model(ckpt)


def test_unexpected_tensor(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    t = _tensors(ckpt)
    t["model.layers.9.self_attn.q_proj.weight"] = torch.zeros(1)
    _rewrite(ckpt, t)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.9"):
        load_model(ckpt)


def test_wrong_shape(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    t = _tensors(ckpt)
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(17, 64)
    _rewrite(ckpt, t)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' has shape \[17, 64\], expected \[16, 64\]"):
        load_model(ckpt)


def test_truncated_file(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(ckpt)


def test_corrupt_header(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(ckpt)


def test_pickle_is_never_loaded(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    (ckpt / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        load_model(ckpt)


def test_index_pointing_to_missing_file(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "x.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing file 'x.safetensors'"):
        load_model(ckpt)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_config_disagreeing_with_tensors(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    cfg = get_preset("tiny").replace(share_q_dim=48).to_dict()
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="q_proj.weight' has shape"):
        load_model(ckpt)
