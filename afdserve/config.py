"""Step-3 text-model configuration: a frozen dataclass built from an HF `config.json`.

Field names are the HF config keys of the released Step-3 checkpoint. Both the released
vision-language form (`model_type: step3_vl`, text fields under `text_config`) and the
text-only form (`model_type: step3_text`, keys at top level) are accepted; unknown keys are
ignored. Values discovered at start-up (KV blocks, topology) never live here.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# KV cache storage choices (--kv-cache-dtype): the run's dtype, or float8 e4m3 (docs/fp8.md).
KV_CACHE_DTYPES = ("auto", "fp8")


class ConfigError(ValueError):
    """A missing or inconsistent config field; the message names the field."""


@dataclass(frozen=True)
class QuantizationConfig:
    """`quantization_config` of a block-scaled FP8 checkpoint (the format of Step-3's FP8 release;
    docs/fp8.md). Only what afdserve can load is accepted."""

    quant_method: str = "fp8"
    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    """Activations stay in the run's dtype on CPU; 'static' (per-tensor input scales) is refused."""
    modules_to_not_convert: tuple[str, ...] = ()
    """Module names (or parts of them) whose weights stay in high precision (`ignored_layers` too)."""

    @classmethod
    def from_dict(cls, raw: Any) -> "QuantizationConfig":
        if not isinstance(raw, dict):
            raise ConfigError("config field 'quantization_config' must be an object")
        method = raw.get("quant_method")
        if method != "fp8":
            raise ConfigError(f"config field 'quantization_config.quant_method' is {method!r}; afdserve loads 'fp8' "
                              "(block-scaled e4m3) checkpoints only")
        fmt = raw.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ConfigError(f"config field 'quantization_config.fmt' is {fmt!r}; only 'e4m3' is supported")
        block = raw.get("weight_block_size") or [128, 128]
        if list(block) != [128, 128]:
            raise ConfigError(f"config field 'quantization_config.weight_block_size' is {block!r}; "
                              "only [128, 128] blocks are supported")
        scheme = raw.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ConfigError(f"config field 'quantization_config.activation_scheme' is {scheme!r}; only 'dynamic' "
                              "is supported (activations are not quantized)")
        skip = list(raw.get("modules_to_not_convert") or []) + list(raw.get("ignored_layers") or [])
        if not all(isinstance(m, str) for m in skip):
            raise ConfigError("config field 'quantization_config.modules_to_not_convert' must list module names")
        return cls(weight_block_size=(128, 128), modules_to_not_convert=tuple(skip))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weight_block_size"] = list(self.weight_block_size)
        d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return d

    def converts(self, module: str) -> bool:
        """Whether the weights of `module` (e.g. 'model.layers.0.self_attn.q_proj') are quantized."""
        return not any(m and m in module for m in self.modules_to_not_convert)


@dataclass(frozen=True)
class Step3Config:
    hidden_size: int
    """Residual width H."""
    num_hidden_layers: int
    """Decoder layers L."""
    num_attention_heads: int
    """Query heads (64 in the release)."""
    head_dim: int
    """Width of each query, key and value head (256 in the release)."""
    share_q_dim: int
    """Rank of the factorised query: q = wq(inter_norm(q_proj(x))), q_proj: H -> share_q_dim."""
    intermediate_size: int
    """SwiGLU width of the dense FFN layers."""
    vocab_size: int
    num_attention_groups: int = 1
    """K/V heads. MFA uses ONE key and ONE value head shared by every query head."""
    moe_layers_enum: tuple[int, ...] = ()
    """Indices of MoE layers; every other layer is dense."""
    moe_num_experts: int = 0
    """Routed experts per MoE layer."""
    moe_top_k: int = 0
    """Experts chosen per token."""
    moe_intermediate_size: int = 0
    """SwiGLU width of one routed expert."""
    share_expert_dim: int = 0
    """SwiGLU width of the always-on shared expert (0: none)."""
    norm_expert_weight: bool = False
    """Renormalise the top-k router weights to sum to one (False in the release)."""
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embedding: int = 65536
    """Context length (HF key is singular; `max_seq_len` is accepted too)."""
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    """Dtype the checkpoint was saved in; the runtime dtype is chosen separately."""
    quantization_config: QuantizationConfig | None = None
    """Set for block-scaled FP8 checkpoints (afdserve/model/fp8.py)."""

    # ------------------------------------------------------------------ derived
    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_attention_groups * self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return i in self._moe_set

    @property
    def _moe_set(self) -> frozenset[int]:
        return frozenset(self.moe_layers_enum)

    # --------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        positive = ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "share_q_dim", "intermediate_size", "vocab_size", "num_attention_groups",
                    "max_position_embedding")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_attention_groups:
            raise ConfigError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple "
                f"of 'num_attention_groups' ({self.num_attention_groups})")
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' must be even for RoPE, got {self.head_dim}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"config field 'rms_norm_eps' must be positive, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError(f"config field 'rope_theta' must be positive, got {self.rope_theta}")
        for i in self.moe_layers_enum:
            if not 0 <= i < self.num_hidden_layers:
                raise ConfigError(
                    f"config field 'moe_layers_enum' has layer {i}, outside 0..{self.num_hidden_layers - 1}")
        if len(set(self.moe_layers_enum)) != len(self.moe_layers_enum):
            raise ConfigError("config field 'moe_layers_enum' lists a layer twice")
        if self.moe_layers_enum:
            for name in ("moe_num_experts", "moe_top_k", "moe_intermediate_size"):
                value = getattr(self, name)
                if not isinstance(value, int) or value <= 0:
                    raise ConfigError(f"config field '{name}' must be a positive integer when "
                                      f"'moe_layers_enum' is set, got {value!r}")
            if self.moe_top_k > self.moe_num_experts:
                raise ConfigError(f"config field 'moe_top_k' ({self.moe_top_k}) exceeds "
                                  f"'moe_num_experts' ({self.moe_num_experts})")
            if self.share_expert_dim < 0:
                raise ConfigError("config field 'share_expert_dim' must be >= 0")
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            raise ConfigError(f"config field 'bos_token_id' ({self.bos_token_id}) is outside the vocabulary")
        for t in self.eos_token_id:
            if not 0 <= t < self.vocab_size:
                raise ConfigError(f"config field 'eos_token_id' ({t}) is outside the vocabulary")

    # ------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Step3Config":
        """Build from an HF config dict (`step3_vl` with `text_config`, or `step3_text`)."""
        if not isinstance(raw, dict):
            raise ConfigError("config must be a JSON object")
        d = dict(raw)
        if d.get("model_type") == "step3_vl" or "text_config" in d:
            text = d.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError("config field 'text_config' is missing or not an object (step3_vl form)")
            d = {**{k: v for k, v in d.items() if k in ("torch_dtype", "bos_token_id", "eos_token_id",
                                                         "quantization_config")}, **text}
        if "max_position_embedding" not in d:
            for alias in ("max_seq_len", "max_position_embeddings"):
                if alias in d:
                    d["max_position_embedding"] = d[alias]
                    break
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        for name in required:
            if kwargs.get(name) is None:
                raise ConfigError(f"config field '{name}' is missing")
        kwargs["moe_layers_enum"] = _parse_layers(kwargs.get("moe_layers_enum", ()))
        eos = kwargs.get("eos_token_id", ())
        kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        if kwargs.get("torch_dtype") is None:
            kwargs.pop("torch_dtype", None)
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = QuantizationConfig.from_dict(kwargs["quantization_config"])
        try:
            return cls(**kwargs)
        except TypeError as exc:  # wrong value types caught before validation
            raise ConfigError(f"invalid config: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Step3Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The text-form HF config dict (`model_type: step3_text`)."""
        d = dataclasses.asdict(self)
        d["moe_layers_enum"] = ",".join(str(i) for i in self.moe_layers_enum)
        d["eos_token_id"] = list(self.eos_token_id)
        if self.quantization_config is None:
            del d["quantization_config"]
        else:
            d["quantization_config"] = self.quantization_config.to_dict()
        return {"model_type": "step3_text", "architectures": ["Step3TextForCausalLM"], **d}

    def replace(self, **changes: Any) -> "Step3Config":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ param counts
    def num_parameters(self) -> dict[str, int]:
        """Total and per-token-active parameter counts, computed from the config alone: the cost
        model's count (`afdserve.cost.arch`, which leaves norms out) plus the RMSNorm weights."""
        from afdserve.cost.arch import from_hf_config
        arch = from_hf_config(self.to_dict())
        norms = self.num_hidden_layers * (self.share_q_dim + 2 * self.hidden_size) + self.hidden_size
        return {"total": arch.total_params() + norms, "active": arch.active_params() + norms}


def _parse_layers(value: Any) -> tuple[int, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        try:
            return tuple(int(p) for p in value.split(",") if p.strip())
        except ValueError:
            raise ConfigError(f"config field 'moe_layers_enum' is not a list of integers: {value!r}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return tuple(value)
    raise ConfigError(f"config field 'moe_layers_enum' is not a list of integers: {value!r}")


def _step3() -> Step3Config:
    return Step3Config(
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=64, num_attention_groups=1,
        head_dim=256, share_q_dim=2048, intermediate_size=18432, vocab_size=128815,
        moe_layers_enum=tuple(range(4, 60)), moe_num_experts=48, moe_top_k=3,
        moe_intermediate_size=5120, share_expert_dim=5120, rope_theta=500000.0,
        max_position_embedding=65536, bos_token_id=0, eos_token_id=(1,), torch_dtype="bfloat16")


def _small() -> Step3Config:
    # Step-3's proportions (one KV head, 16 wide query heads from a low-rank query, dense first
    # and last layers, 16 routed experts top-3 + a shared expert), ~277M parameters.
    return Step3Config(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=16, num_attention_groups=1,
        head_dim=128, share_q_dim=384, intermediate_size=2048, vocab_size=32000,
        moe_layers_enum=tuple(range(2, 11)), moe_num_experts=16, moe_top_k=3,
        moe_intermediate_size=512, share_expert_dim=512, rope_theta=500000.0,
        max_position_embedding=8192, bos_token_id=0, eos_token_id=(1,), torch_dtype="float32")


def _tiny() -> Step3Config:
    # A few hundred thousand parameters: every feature (MFA, MoE + shared expert, dense layers
    # at both ends) in a model that runs in milliseconds. For tests.
    return Step3Config(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_attention_groups=1,
        head_dim=16, share_q_dim=32, intermediate_size=128, vocab_size=512,
        moe_layers_enum=(1, 2), moe_num_experts=4, moe_top_k=2, moe_intermediate_size=32,
        share_expert_dim=32, rope_theta=10000.0, max_position_embedding=1024,
        bos_token_id=0, eos_token_id=(1,), torch_dtype="float32")


PRESETS = {"step3": _step3, "small": _small, "tiny": _tiny}


def get_preset(name: str) -> Step3Config:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset '{name}'; choose from {', '.join(PRESETS)}") from None
