"""Safetensors checkpoints with HF Step-3 tensor names: load (strict, memory-mapped), save, init.

Loading checks the whole checkpoint against the config (every tensor present, none unexpected,
every shape right) before reading any weight, then reads only the tensors (or slices) the
requested role and shard hold, straight from the memory-mapped file into the parameter. Pickle
is never loaded: only `.safetensors` files are read.
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

from afdserve.config import Step3Config
from afdserve.model.step3 import FFNShard, Role, Step3ForCausalLM, checkpoint_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors of the vision tower in a step3_vl checkpoint; a text-only loader skips them.
VISION_PREFIXES = ("vision_model.", "vit_downsampler.", "vit_downsampler2.", "vit_large_projector.",
                   "model.vision_model.", "model.vit_")
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config, or a damaged file; the message names it."""


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
               device: str | torch.device = "cpu", progress: bool = False) -> Step3ForCausalLM:
    """Build the model for `role`/`shard` and fill it from the checkpoint in `model_dir`.

    The module is created on the meta device, then each parameter is set from its tensor in the
    memory-mapped file (cast to `dtype` when needed), so weights are never held twice.
    """
    model_dir = Path(model_dir)
    config = config or Step3Config.from_file(model_dir)
    dtype = parse_dtype(dtype)
    files = _checkpoint_files(model_dir)
    reader = _Reader(files)
    sources = _resolve_names(config, files)
    _check_shapes(config, reader, sources)
    with torch.device("meta"):
        model = Step3ForCausalLM(config, role, shard)
    slices = model.shard_slices()
    params = list(model.named_parameters())
    iterator = params
    if progress:
        from rich.progress import track
        iterator = track(params, description=f"loading {model_dir.name}", transient=True)
    for name, param in iterator:
        tensor = _read_param(reader, sources[name], slices.get(name))
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"tensor '{name}' has shape {list(tensor.shape)}, expected {list(param.shape)}")
        _set_parameter(model, name, tensor.to(device=device, dtype=dtype))
    model.init_rope(device)
    return model.eval()


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


def save_checkpoint(model: Step3ForCausalLM, out_dir: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors (HF names) for a full model."""
    if model.role != "full" or model.shard.world != 1:
        raise ValueError("only a full, unsharded model can be saved")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dt = parse_dtype(dtype) if dtype else next(model.parameters()).dtype
    tensors = {n: p.detach().to(dt).contiguous() for n, p in model.named_parameters()}
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dt]
    config = model.config.replace(torch_dtype=dtype_name)
    save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out


def init_checkpoint(config: Step3Config, out_dir: str | Path, seed: int = 0, dtype: str = "float32") -> Path:
    """A random-initialised checkpoint anyone can run without downloading weights."""
    model = init_random(Step3ForCausalLM(config), seed)
    return save_checkpoint(model, out_dir, dtype)
