"""Safetensors checkpoints with HF Step-3 tensor names: load (strict, memory-mapped), save, init.

Loading checks the whole checkpoint against the config (every tensor present, none unexpected,
every shape right) before reading any weight, then reads only the tensors (or slices) the
requested role and shard hold, straight from the memory-mapped file into the parameter. Pickle
is never loaded: only `.safetensors` files are read.

Block-scaled FP8 checkpoints (`quantization_config.quant_method: fp8`; e4m3 `*.weight` with fp32
`*.weight_scale_inv`) load their linear weights as `Fp8Weight`s (afdserve/model/fp8.py, kept in 8
bits); `quantization="fp8"` quantizes a high-precision checkpoint's linear weights the same way at
load, and `save_checkpoint(..., quantization="fp8")` writes such a checkpoint (docs/fp8.md).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from afdserve.config import QuantizationConfig, Step3Config
from afdserve.model.fp8 import BLOCK, FP8, Fp8Weight, quantize
from afdserve.model.step3 import FFNShard, Role, Step3ForCausalLM, checkpoint_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors of the vision tower in a step3_vl checkpoint; a text-only loader skips them.
VISION_PREFIXES = ("vision_model.", "vit_downsampler.", "vit_downsampler2.", "vit_large_projector.",
                   "model.vision_model.", "model.vit_")
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# The linear weights FP8 checkpoints quantize (norms, embeddings, the LM head and the router stay).
QUANTIZED = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|wq|o_proj)|"
                       r"(mlp|share_expert|moe)\.(gate_proj|up_proj|down_proj))\.weight$")
SCALE_SUFFIX = "_scale_inv"
QUANTIZATIONS = (None, "fp8")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config, or a damaged file; the message names it."""


class Fp8CheckpointError(CheckpointError):
    """A malformed FP8 checkpoint (a scale missing or of the wrong shape, NaN codes, ...)."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from float32, bfloat16, float16") from None


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises SafetensorError, OSError and others
        raise CheckpointError(f"cannot read {path.name}: {exc} (truncated or corrupt safetensors file?)") from None


def _checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the index or the single file's header."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{INDEX_FILE} is malformed: {exc}") from None
        files = {}
        for name, fname in weight_map.items():
            path = model_dir / fname
            if not path.is_file():
                raise CheckpointError(f"{INDEX_FILE} maps '{name}' to missing file '{fname}'")
            files[name] = path
        return files
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        found = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {', '.join(found)}; pickle checkpoints are never loaded)" if found else ""
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}{hint}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


class _Reader:
    """Open safetensors handles by file, reading tensors or slices lazily (memory-mapped)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._handles: dict[Path, object] = {}

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = _open(path).__enter__()
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype name ('F8_E4M3', 'BF16', ...)."""
        return self._handle(name).get_slice(name).get_dtype()

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        try:
            if dim is None:
                return self._handle(name).get_tensor(name)
            sl = self._handle(name).get_slice(name)
            index = (slice(None),) * dim + (slice(start, stop),)
            return sl[index]
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor '{name}' from {self.files[name].name}: {exc} "
                                  "(truncated or corrupt file?)") from None


def _resolve_names(config: Step3Config, available: dict[str, Path]) -> dict[str, list[str]]:
    """Checks the checkpoint against the config; returns name -> source tensors ([name], or per-expert names)."""
    expected = checkpoint_shapes(config)
    per_expert: dict[str, dict[int, str]] = {}
    unexpected = []
    for name in available:
        if name.startswith(VISION_PREFIXES):
            continue
        m = _PER_EXPERT.match(name)
        if m:
            stacked = f"{m.group(1)}.{m.group(3)}.weight"
            if stacked in expected and int(m.group(2)) < config.moe_num_experts:
                per_expert.setdefault(stacked, {})[int(m.group(2))] = name
                continue
        if name not in expected:
            unexpected.append(name)
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise CheckpointError(f"unexpected tensor '{unexpected[0]}' in checkpoint{more}: "
                              "it does not belong to a model of this config")
    sources = {}
    for name in expected:
        if name in available:
            sources[name] = [name]
        elif name in per_expert:
            got = per_expert[name]
            missing = [e for e in range(config.moe_num_experts) if e not in got]
            if missing:
                base = name.rsplit(".", 2)
                raise CheckpointError(f"missing tensor '{base[0]}.experts.{missing[0]}.{base[1]}.weight'")
            sources[name] = [got[e] for e in range(config.moe_num_experts)]
        else:
            raise CheckpointError(f"missing tensor '{name}'")
    return sources


def _check_shapes(config: Step3Config, reader: _Reader, sources: dict[str, list[str]]) -> None:
    for name, shape in checkpoint_shapes(config).items():
        src = sources[name]
        want = shape if len(src) == 1 else shape[1:]
        for s in src:
            got = reader.shape(s)
            if got != want:
                raise CheckpointError(f"tensor '{s}' has shape {list(got)}, expected {list(want)}")


def _read_param(reader: _Reader, src: list[str], sl: tuple[int, int, int] | None) -> torch.Tensor:
    if len(src) == 1:
        return reader.read(src[0], *sl) if sl else reader.read(src[0])
    # Per-expert checkpoint: stack the experts this shard owns (dim 0 of the stacked tensor).
    first, stop = (sl[1], sl[2]) if sl else (0, len(src))
    return torch.stack([reader.read(s) for s in src[first:stop]])


def load_model(model_dir: str | Path, dtype: str | torch.dtype = "float32", role: Role = "full",
               shard: FFNShard = FFNShard(), config: Step3Config | None = None,
               device: str | torch.device = "cpu", progress: bool = False,
               quantization: str | None = None) -> Step3ForCausalLM:
    """Build the model for `role`/`shard` and fill it from the checkpoint in `model_dir`.

    The module is created on the meta device, then each parameter is set from its tensor in the
    memory-mapped file (cast to `dtype` when needed), so weights are never held twice. FP8 tensors
    become `Fp8Weight`s; `quantization="fp8"` quantizes the other linear weights at load.
    """
    model_dir = Path(model_dir)
    config = config or Step3Config.from_file(model_dir)
    dtype = parse_dtype(dtype)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose from fp8 (or none)")
    all_files = _checkpoint_files(model_dir)
    files = {n: p for n, p in all_files.items() if not n.endswith(SCALE_SUFFIX)}
    reader = _Reader(all_files)
    sources = _resolve_names(config, files)
    _check_shapes(config, reader, sources)
    fp8 = _check_fp8(config, reader, sources, all_files)
    qconfig = config.quantization_config or QuantizationConfig()
    with torch.device("meta"):
        model = Step3ForCausalLM(config, role, shard)
    slices = model.shard_slices()
    params = list(model.named_parameters())
    iterator = params
    if progress:
        from rich.progress import track
        iterator = track(params, description=f"loading {model_dir.name}", transient=True)
    for name, param in iterator:
        src, sl = sources[name], slices.get(name)
        if name in fp8 or (quantization == "fp8" and QUANTIZED.match(name) and qconfig.converts(name[:-7])):
            w = _read_fp8(reader, src, sl) if name in fp8 else _quantize_param(reader, src, sl)
            if tuple(w.shape) != tuple(param.shape):
                raise CheckpointError(f"tensor '{name}' has shape {list(w.shape)}, expected {list(param.shape)}")
            if QUANTIZED.match(name):
                _set_quantized(model, name, w.to(device))
                continue
            tensor = w.dequantize(dtype)                 # an FP8 tensor afdserve keeps in high precision
        else:
            tensor = _read_param(reader, src, sl)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"tensor '{name}' has shape {list(tensor.shape)}, expected {list(param.shape)}")
        _set_parameter(model, name, tensor.to(device=device, dtype=dtype))
    model.init_rope(device)
    return model.eval()


def _check_fp8(config: Step3Config, reader: _Reader, sources: dict[str, list[str]],
               files: dict[str, Path]) -> set[str]:
    """Names of the parameters stored in FP8; checks every scale tensor before any weight is read."""
    fp8 = set()
    for name, src in sources.items():
        kinds = {_check_fp8_tensor(reader, s, files) for s in src}
        if "F8_E4M3" in kinds:
            if len(kinds) > 1:
                raise Fp8CheckpointError(f"the experts of '{name}' are stored in different dtypes {sorted(kinds)}")
            fp8.add(name)
    for n in files:
        if n.endswith(SCALE_SUFFIX) and n[:-len(SCALE_SUFFIX)] not in files and not n.startswith(VISION_PREFIXES):
            raise Fp8CheckpointError(f"scale tensor '{n}' has no weight '{n[:-len(SCALE_SUFFIX)]}' in the checkpoint")
    if fp8 and config.quantization_config is None:
        raise Fp8CheckpointError(f"tensor '{sources[min(fp8)][0]}' is FP8 but config.json has no "
                                 "quantization_config (quant_method fp8, weight_block_size [128, 128])")
    return fp8


def _check_fp8_tensor(reader: _Reader, name: str, files: dict[str, Path]) -> str:
    """The tensor's dtype name, after checking its scale (present with the right shape iff FP8)."""
    dt, scale = reader.dtype(name), name + SCALE_SUFFIX
    if dt == "F8_E4M3":
        if scale not in files:
            raise Fp8CheckpointError(f"FP8 tensor '{name}' has no block scales '{scale}'")
        shape = reader.shape(name)
        want = (*shape[:-2], -(-shape[-2] // BLOCK), -(-shape[-1] // BLOCK))
        if reader.shape(scale) != want:
            raise Fp8CheckpointError(f"scale tensor '{scale}' has shape {list(reader.shape(scale))}, expected "
                                     f"{list(want)} (one per {BLOCK} x {BLOCK} block of {list(shape)})")
        if reader.dtype(scale) not in ("F32", "BF16", "F16"):
            raise Fp8CheckpointError(f"scale tensor '{scale}' is {reader.dtype(scale)}, expected F32")
    elif dt.startswith("F8"):
        raise Fp8CheckpointError(f"tensor '{name}' is {dt}; afdserve loads e4m3 (F8_E4M3) weights only")
    elif scale in files:
        raise Fp8CheckpointError(f"'{scale}' scales tensor '{name}', which is {dt}, not F8_E4M3")
    return dt


def _read_fp8(reader: _Reader, src: list[str], sl: tuple[int, int, int] | None) -> Fp8Weight:
    """The FP8 codes and scales of a parameter (or of the slice this shard holds: whole experts, or
    rows / columns on the checkpoint's block grid)."""
    if len(src) > 1:                                     # per-expert tensors, stacked here
        first, stop = (sl[1], sl[2]) if sl else (0, len(src))
        parts = [_read_fp8(reader, [s], None) for s in src[first:stop]]
        return Fp8Weight(torch.stack([p.codes for p in parts]), torch.stack([p.scale for p in parts]))
    name, scale = src[0], src[0] + SCALE_SUFFIX
    if sl is None or len(reader.shape(name)) == 3:      # whole tensor, or whole experts (dim 0)
        w = Fp8Weight(reader.read(name, *sl) if sl else reader.read(name),
                      reader.read(scale, *sl) if sl else reader.read(scale))
    else:
        dim, a, b = sl
        w = Fp8Weight(reader.read(name, dim, a, b), reader.read(scale, dim, a // BLOCK, -(-b // BLOCK)),
                      row_offset=a % BLOCK if dim == 0 else 0, col_offset=a % BLOCK if dim == 1 else 0)
    if ((w.codes & 0x7F) == 0x7F).any():
        raise Fp8CheckpointError(f"FP8 tensor '{name}' holds NaN codes (0x7f / 0xff)")
    return w


def _quantize_param(reader: _Reader, src: list[str], sl: tuple[int, int, int] | None) -> Fp8Weight:
    """Quantize a high-precision parameter (or this shard's slice of it) on the block grid of the
    whole checkpoint tensor, so every shard holds what the whole weight quantizes to."""
    if len(src) > 1 or sl is None or len(reader.shape(src[0])) == 3:
        return quantize(_read_param(reader, src, sl))
    dim, a, b = sl
    lo, hi = a // BLOCK * BLOCK, min(reader.shape(src[0])[dim], -(-b // BLOCK) * BLOCK)
    w = quantize(reader.read(src[0], dim, lo, hi))
    return w.rows(a - lo, b - lo) if dim == 0 else w.cols(a - lo, b - lo)


def _set_quantized(model: nn.Module, name: str, value: Fp8Weight) -> None:
    """Replace the parameter `name` by a quantized weight (a plain attribute: `linear` and F.linear
    accept it in place of the tensor)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    del module._parameters[attr]
    setattr(module, attr, value)


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def init_random(model: Step3ForCausalLM, seed: int = 0) -> Step3ForCausalLM:
    """Random weights with unit-scale activations (std 1/sqrt(fan_in)), norms at one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=gen)
    return model


def save_checkpoint(model: Step3ForCausalLM, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                    quantization: str | None = None) -> Path:
    """Write config.json + model.safetensors (HF names) for a full model. `quantization="fp8"` stores
    the linear weights as e4m3 codes with 128 x 128 block scales (`*.weight_scale_inv`) and adds the
    quantization_config (docs/fp8.md); `dtype` is the precision of the other tensors."""
    if model.role != "full" or model.shard.world != 1:
        raise ValueError("only a full, unsharded model can be saved")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose from fp8 (or none)")
    named = dict(model.named_parameters())
    missing = sorted(set(checkpoint_shapes(model.config)) - set(named))
    if missing:
        raise ValueError(f"cannot save '{missing[0]}': the model holds it quantized; save a high-precision model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dt = parse_dtype(dtype) if dtype else next(iter(named.values())).dtype
    tensors = {}
    for n, p in named.items():
        if quantization == "fp8" and QUANTIZED.match(n):
            w = quantize(p.detach())
            tensors[n], tensors[n + SCALE_SUFFIX] = w.codes.view(FP8), w.scale
        else:
            tensors[n] = p.detach().to(dt).contiguous()
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dt]
    config = model.config.replace(torch_dtype=dtype_name,
                                  quantization_config=QuantizationConfig() if quantization else None)
    save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out


def init_checkpoint(config: Step3Config, out_dir: str | Path, seed: int = 0, dtype: str = "float32") -> Path:
    """A random-initialised checkpoint anyone can run without downloading weights. dtype "fp8":
    block-scaled FP8 linear weights, the other tensors in bfloat16 (the form of Step-3's FP8 release)."""
    model = init_random(Step3ForCausalLM(config), seed)
    if dtype == "fp8":
        return save_checkpoint(model, out_dir, "bfloat16", quantization="fp8")
    return save_checkpoint(model, out_dir, dtype)
