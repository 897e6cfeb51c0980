"""Block-scaled FP8 (e4m3) weights: quantization, dequantization and the GEMMs that read them.

The format is the one of Step-3's FP8 release (docs/fp8.md): a linear weight [.., out, in] is
stored as e4m3 codes plus one fp32 scale per 128 x 128 block (`weight_scale_inv`, shape
[.., ceil(out/128), ceil(in/128)]); the weight is code value x its block's scale.

`Fp8Weight` keeps the codes (one byte per weight) and the scales in memory and takes the place of
a layer's `weight`: `afdserve.model.kernels.linear(x, w)` and `F.linear(x, w)` both end in
`Fp8Weight.linear`, which for few rows on x86-64 runs the native kernel (afdserve/native/
fp8_kernels.c: the bytes are widened to fp32 in registers, fp32 accumulation) and otherwise
dequantizes tiles of the weight to the activations' dtype for torch's matmul (the reference, and
the path without a compiler or on other devices). Slices of a checkpoint tensor (FFN shards) keep
the checkpoint's block grid through row/column offsets, so a shard computes exactly what the
whole weight computes for its rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK = 128                         # columns per scale (and rows, in checkpoints)
E4M3_MAX = 448.0                    # largest finite e4m3fn value
FP8 = torch.float8_e4m3fn
NATIVE_MAX_ROWS = 16                # rows up to which the native kernel beats dequantize + matmul
_TILE_ELEMS = 1 << 22               # weights dequantized at once on the many-row path


def _native():
    try:
        from afdserve import _fp8
        return _fp8 if _fp8.available() else None
    except Exception:                                  # not built, or another platform
        return None


_NATIVE = _native()
# bf16 activations: the AVX512-BF16 kernel (weights widened to bf16, vdpbf16ps), where the CPU has it.
NATIVE_BF16 = _NATIVE is not None and _NATIVE.bf16_available()


def e4m3_values() -> torch.Tensor:
    """The 256 e4m3fn code values as fp32, decoded from the bit fields (NaN for 0x7f and 0xff)."""
    codes = torch.arange(256)
    e, m = (codes >> 3) & 15, (codes & 7).double()
    mag = torch.where(e > 0, (8 + m) * torch.exp2(e.double() - 10), m * 2.0 ** -9)
    mag[(codes & 0x7F) == 0x7F] = math.nan
    return torch.where(codes >= 128, -mag, mag).float()


def quantize(w: torch.Tensor, block: int = BLOCK) -> "Fp8Weight":
    """w [.., out, in] -> e4m3 codes and one scale per block x block tile (scale = amax / 448, 1 for
    an all-zero tile); codes = round-to-nearest-even(w / scale)."""
    out, inp = w.shape[-2:]
    nrb, nkb = -(-out // block), -(-inp // block)
    wp = F.pad(w.float(), (0, nkb * block - inp, 0, nrb * block - out))
    tiles = wp.unflatten(-1, (nkb, block)).unflatten(-3, (nrb, block))          # [.., nrb, B, nkb, B]
    amax = tiles.abs().amax(dim=(-3, -1))                                          # [.., nrb, nkb]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    codes = (tiles / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    codes = codes.flatten(-4, -3).flatten(-2, -1)[..., :out, :inp].contiguous()
    return Fp8Weight(codes.view(torch.uint8), scale.contiguous(), block)


def _check_cat(parts: list) -> bool:
    """True when `parts` (along rows) can share one code and scale tensor: all Fp8Weight on one block
    grid, each starting on a block row, all but the last ending on one."""
    if not all(isinstance(p, Fp8Weight) for p in parts):
        return False
    p0 = parts[0]
    same = all(p.row_block == p0.row_block and p.col_offset == p0.col_offset and p.shape[:-2] == p0.shape[:-2]
               and p.shape[-1] == p0.shape[-1] and p.scale.shape[-1] == p0.scale.shape[-1] for p in parts)
    aligned = all(p.row_offset == 0 for p in parts) and all(p.shape[-2] % p.row_block == 0 for p in parts[:-1])
    return same and aligned


class QuantizedLinearWeight:
    """What `linear` and `F.linear` accept in place of a weight tensor: shape, device, `linear(x)`,
    `[e]` (one expert of a stacked weight) and `[..., a:b, :]` (rows), plus what
    `kernels.prepare_for_decode` uses to fuse projections (`torch.cat`, `detach`, `.data =`)."""

    dtype = FP8

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def detach(self):
        return self

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def requires_grad(self) -> bool:
        return False

    @property
    def data(self):
        return self

    @data.setter
    def data(self, other) -> None:
        """Rebind to `other` (a view of fused storage, as `prepare_for_decode` does with parameters)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot rebind a {type(self).__name__} to {type(other).__name__}")
        if other is not self:
            self.__dict__.clear()
            self.__dict__.update(other.__dict__)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = w.linear(x)
            return y if bias is None else y + bias
        if func is torch.cat:
            parts = list(args[0])
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim not in (-2, len(parts[0].shape) - 2):
                raise TypeError("quantized weights are concatenated along their rows (dim -2) only")
            return Fp8Weight.cat(parts) if _check_cat(parts) else ConcatWeight(parts)
        raise TypeError(f"{func.__name__} is not supported on quantized weights (only linear and cat)")


class Fp8Weight(QuantizedLinearWeight):
    """e4m3 codes (uint8 [.., out, in], unit stride along `in`) and fp32 scales
    [.., ceil((row_offset + out) / row_block), ceil((col_offset + in) / 128)]:
    weight[i, j] = e4m3(codes[i, j]) * scale[(i + row_offset) // row_block, (j + col_offset) // 128]."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, row_block: int = BLOCK,
                 row_offset: int = 0, col_offset: int = 0):
        if codes.dtype is FP8:
            codes = codes.view(torch.uint8)
        if codes.dtype is not torch.uint8 or codes.dim() < 2 or scale.dim() != codes.dim():
            raise ValueError(f"fp8 weight: codes {codes.dtype} {tuple(codes.shape)} / scales {tuple(scale.shape)}")
        want = (*codes.shape[:-2], -(-(row_offset + codes.shape[-2]) // row_block),
                -(-(col_offset + codes.shape[-1]) // BLOCK))
        if tuple(scale.shape) != want:
            raise ValueError(f"fp8 weight of shape {list(codes.shape)} needs scales of shape {list(want)}, "
                             f"got {list(scale.shape)}")
        self.codes = codes if codes.stride(-1) == 1 else codes.contiguous()
        self.scale = scale.float() if scale.stride(-1) == 1 else scale.float().contiguous()
        self.row_block, self.row_offset, self.col_offset = row_block, row_offset, col_offset

    # ------------------------------------------------------------------ tensor-like
    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def is_cpu(self) -> bool:
        return self.codes.is_cpu

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel()

    def to(self, device) -> "Fp8Weight":
        return Fp8Weight(self.codes.to(device), self.scale.to(device), self.row_block, self.row_offset,
                         self.col_offset)

    def __repr__(self) -> str:
        return f"Fp8Weight(shape={list(self.shape)}, block=({self.row_block}, {BLOCK}))"

    def __getitem__(self, index) -> "Fp8Weight":
        if isinstance(index, int) and self.codes.dim() > 2:
            experts = self.__dict__.setdefault("_experts", {})     # one view per expert, made once
            if index not in experts:
                experts[index] = Fp8Weight(self.codes[index], self.scale[index], self.row_block, self.row_offset,
                                           self.col_offset)
            return experts[index]
        if isinstance(index, tuple) and len(index) == 3 and index[0] is Ellipsis and index[2] == slice(None) \
                and isinstance(index[1], slice) and index[1].step in (None, 1):
            a, b, _ = index[1].indices(self.shape[-2])
            return self.rows(a, b)
        raise TypeError(f"Fp8Weight supports w[expert] and w[..., a:b, :], not {index!r}")

    def rows(self, a: int, b: int) -> "Fp8Weight":
        """Rows [a, b) (dim -2), on the same block grid."""
        first, off = divmod(self.row_offset + a, self.row_block)
        last = -(-(self.row_offset + b) // self.row_block)
        return Fp8Weight(self.codes[..., a:b, :], self.scale[..., first:last, :], self.row_block, off,
                         self.col_offset)

    def cols(self, a: int, b: int) -> "Fp8Weight":
        """Columns [a, b) (dim -1), on the same block grid."""
        first, off = divmod(self.col_offset + a, BLOCK)
        last = -(-(self.col_offset + b) // BLOCK)
        return Fp8Weight(self.codes[..., a:b], self.scale[..., first:last], self.row_block, self.row_offset, off)

    @staticmethod
    def cat(parts: list["Fp8Weight"]) -> "Fp8Weight":
        """Block-aligned concatenation along rows (see `_check_cat`)."""
        return Fp8Weight(torch.cat([p.codes for p in parts], -2), torch.cat([p.scale for p in parts], -2),
                         parts[0].row_block, 0, parts[0].col_offset)

    # ------------------------------------------------------------------ values
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense tensor (exact in fp32: code value x scale); the native kernel
        widens the codes on the CPU, torch's float8 conversion elsewhere (`dequantize_torch`)."""
        if _NATIVE is None or not self.codes.is_cpu or self.codes.dim() != 2 or not self.codes.numel():
            return self.dequantize_torch(dtype)
        (n, k), s = self.shape, self.scale
        out = torch.empty(n, k, dtype=torch.float32)
        _NATIVE.dequantize(self.codes.data_ptr(), self.codes.stride(0) if n > 1 else k, s.data_ptr(),
                           s.stride(0) if s.shape[0] > 1 else s.shape[1], self.row_block, self.row_offset,
                           self.col_offset, out.data_ptr(), k, n, k)
        return out if dtype is torch.float32 else out.to(dtype)

    def dequantize_torch(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`dequantize` with torch ops only (any device, any leading dims)."""
        out, inp = self.shape[-2:]
        s = self.scale.repeat_interleave(self.row_block, -2).repeat_interleave(BLOCK, -1)
        s = s[..., self.row_offset:self.row_offset + out, self.col_offset:self.col_offset + inp]
        return (self.codes.view(FP8).float() * s).to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., in] @ weight^T in x's dtype (fp32 accumulation)."""
        if self.codes.dim() != 2:
            raise ValueError(f"linear needs a 2-D weight, got an fp8 weight of shape {list(self.shape)}")
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        if _NATIVE is not None and 0 < rows <= NATIVE_MAX_ROWS and x2.is_cpu and self.codes.is_cpu \
                and x2.shape[-1] == self.shape[1]:
            y = native_linear(x2, self)
        else:
            y = dequantize_linear(x2, self)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.shape[0])

    def native_args(self) -> tuple[int, int, int, int]:
        """(codes address, leading dimension, scales address, leading dimension) for the kernels."""
        args = self.__dict__.get("_native_args")
        if args is None:
            (n, k), s = self.shape, self.scale
            args = self._native_args = (self.codes.data_ptr(), self.codes.stride(0) if n > 1 else k, s.data_ptr(),
                                        s.stride(0) if s.shape[0] > 1 else s.shape[1])
        return args


def native_linear(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """x [M, in] (CPU) @ w^T with the native kernel; fp32 accumulation, result in x's dtype."""
    if NATIVE_BF16 and x.dtype is torch.bfloat16 and w.col_offset == 0:
        return _native_linear_bf16(x, w)
    xf = x.float()
    if xf.stride(-1) != 1 or (xf.shape[0] > 1 and xf.stride(0) < xf.shape[1]):
        xf = xf.contiguous()
    (M, K), N = xf.shape, w.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    if N and K:
        _NATIVE.gemm(xf.data_ptr(), xf.stride(0) if M > 1 else K, *w.native_args(), w.row_block, w.row_offset,
                     w.col_offset, y.data_ptr(), N, M, N, K)
    else:
        y.zero_()
    return y if x.dtype is torch.float32 else y.to(x.dtype)


def _native_linear_bf16(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y = torch.empty(M, N, dtype=torch.bfloat16)
    _NATIVE.gemm_bf16(x.data_ptr(), x.stride(0) if M > 1 else K, *w.native_args(), w.row_block, w.row_offset,
                      y.data_ptr(), N, M, N, K)
    return y


def dequantize_linear(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """x [M, in] @ w^T: tiles of w's rows dequantized to x's dtype, torch's matmul on each (the
    reference, the many-row path, and the path without the native kernel)."""
    n, k = w.shape
    step = max(w.row_block, _TILE_ELEMS // max(k, 1) // w.row_block * w.row_block)
    if step >= n:
        return F.linear(x, w.dequantize(x.dtype))
    return torch.cat([F.linear(x, w.rows(a, min(n, a + step)).dequantize(x.dtype)) for a in range(0, n, step)], -1)


class ConcatWeight(QuantizedLinearWeight):
    """Weights fused along rows that cannot share one block grid (rows not a multiple of the block,
    or quantized and unquantized parts together): one product per part, outputs concatenated."""

    def __init__(self, parts: list):
        self.parts = parts

    @property
    def shape(self) -> torch.Size:
        p = self.parts[0].shape
        return torch.Size((*p[:-2], sum(q.shape[-2] for q in self.parts), p[-1]))

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def __getitem__(self, index):
        if isinstance(index, int):
            return ConcatWeight([p[index] for p in self.parts])
        if isinstance(index, tuple) and len(index) == 3 and isinstance(index[1], slice):
            a, b, _ = index[1].indices(self.shape[-2])
            start = 0
            for p in self.parts:
                if (a, b) == (start, start + p.shape[-2]):
                    return p
                start += p.shape[-2]
        raise TypeError(f"ConcatWeight supports w[expert] and w[..., a:b, :] over one part, not {index!r}")

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        from afdserve.model.kernels import linear
        return torch.cat([linear(x, p) for p in self.parts], -1)
