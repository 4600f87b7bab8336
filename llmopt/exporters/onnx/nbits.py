"""Stored GPTQ/RTN codes of an llmopt folder → ONNX Runtime ``MatMulNBits`` initializers, exactly.

``MatMulNBits`` (domain ``com.microsoft``) computes ``Y = A · Bᵀ_deq`` where the weight of the original
``MatMul`` is (K, N) = Wᵀ and llmopt's codes are W's (out=N, in=K). Its initializers:

* ``B``: uint8 (N, n_blocks, block_size·bits/8): row n of W, block by block, two 4-bit codes per byte,
  the even column in the low nibble;
* ``scales``: float32 (N·n_blocks,), row-major (n, block);
* ``zero_points`` (optional): uint8 (N, ⌈n_blocks/2⌉), packed like B; when absent every zero point
  is 2ᵇ⁻¹ = 8.

The value of code q in block (n, b) is ``scale[n, b] · (q − zp[n, b])``, the same float32 arithmetic as
llmopt's formats, so the mapping is exact when the format is one of :data:`ONNX_EXACT`:

* ``q4_0``: value d·(q − 8), blocks of 32 → scales d, no zero points;
* ``int4`` symmetric (zero point 8) or asymmetric (integer zero points 0..15) with groups whose size is a
  power of two ≥ 16 (``MatMulNBits``' block sizes).

Every conversion is checked by dequantizing the packed initializers with :func:`dequantize_nbits` (a
numpy transcription of ONNX Runtime's reference) against the format's own dequantization, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmopt.errors import LLMOptError
from llmopt.formats import IntFormat, QuantFormat

ONNX_EXACT = "q4_0, int4 (symmetric, or integer zero-points) in groups of 16, 32, 64, 128 or 256 columns"


@dataclass
class NBitsWeight:
    """The initializers of one ``MatMulNBits``: B (N, n_blocks, block_size/2) uint8, scales (N·n_blocks,)
    float32, zero_points (N, ⌈n_blocks/2⌉) uint8 or None (all 8), and the attributes K, N, block_size."""

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int
    block_size: int
    bits: int = 4


def refusal(linear: str, fmt: QuantFormat, why: str) -> LLMOptError:
    """The one-line error for a Linear whose stored format ``MatMulNBits`` cannot hold exactly."""
    return LLMOptError(
        f"{linear} is quantized to {fmt}, which {why}; ONNX Runtime's MatMulNBits holds exactly only {ONNX_EXACT}: "
        "export with --quant none (float weights) or re-quantize with --quant int4-rtn / int4-hqq"
    )


def block_of(linear: str, fmt: QuantFormat, in_features: int | None = None) -> int:
    """The ``MatMulNBits`` block size of ``fmt``, or a one-line refusal when it cannot map exactly.

    ``in_features`` resolves per-channel int formats (one group = the whole row); without it they pass."""
    if fmt.name == "q4_0":
        return 32
    if not isinstance(fmt, IntFormat):
        raise refusal(linear, fmt, "has no MatMulNBits equivalent (d·q + m blocks, or not 4-bit)")
    if fmt.bits != 4:
        raise refusal(linear, fmt, f"is {fmt.bits}-bit")
    size = fmt.group_size or in_features
    if size is None:
        return 0
    if size < 16 or size & (size - 1) or size > 256:
        raise refusal(linear, fmt, f"has groups of {size} columns, not a MatMulNBits block size")
    return size


def _pack4(codes: np.ndarray) -> np.ndarray:
    """uint8 (..., 2m) codes 0..15 → (..., m) bytes, element 2i in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _unpack4(packed: np.ndarray) -> np.ndarray:
    """(..., m) bytes → (..., 2m) codes, low nibble first."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def to_nbits(
    linear: str, fmt: QuantFormat, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> NBitsWeight:
    """Pack one stored Linear. codes (N, K) uint8; scale / zero (N, n_groups) as stored.

    Raises the one-line refusal when the format cannot be held exactly."""
    n, k = codes.shape
    bs = block_of(linear, fmt, k)
    if k % bs:
        raise refusal(linear, fmt, f"has {k} input columns, not whole blocks of {bs}")
    nb = k // bs
    if scale.shape != (n, nb):
        raise refusal(linear, fmt, f"stores {tuple(scale.shape)} group parameters for {nb} blocks per row")
    c = codes.to(torch.uint8).numpy()
    if c.max(initial=0) > 15:
        raise refusal(linear, fmt, "has codes above 15")
    b = _pack4(c.reshape(n, nb, bs))
    scales = scale.to(torch.float32).contiguous().numpy().reshape(-1).copy()
    zp = None
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        z = zero.to(torch.float32).numpy()
        if not np.array_equal(z, np.round(z)) or z.min(initial=0) < 0 or z.max(initial=0) > 15:
            raise refusal(linear, fmt, "has zero-points that are not integers 0..15")
        zi = z.astype(np.uint8)
        if nb % 2:
            zi = np.concatenate([zi, np.zeros((n, 1), np.uint8)], axis=1)
        zp = _pack4(zi)
    elif isinstance(fmt, IntFormat) and not torch.all(zero == 8):
        raise refusal(linear, fmt, "is symmetric but stores zero-points other than 8")
    return NBitsWeight(b=b, scales=scales, zero_points=zp, k=k, n=n, block_size=bs)


def dequantize_nbits(
    b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, block_size: int
) -> np.ndarray:
    """Reference 4-bit ``MatMulNBits`` dequantization: float32 (N, K) = Wᵀ of the MatMul's (K, N) weight.

    value = scale · (q − zp) in float32 per block (zp 8 without ``zero_points``); the padding of a last
    partial block is dropped."""
    nb = (k + block_size - 1) // block_size
    q = _unpack4(b.reshape(n, nb, -1)).astype(np.float32)  # (N, nb, block_size)
    if zero_points is None:
        zp = np.full((n, nb), 8.0, np.float32)
    else:
        zp = _unpack4(zero_points.reshape(n, -1))[:, :nb].astype(np.float32)
    s = scales.reshape(n, nb).astype(np.float32)
    w = s[:, :, None] * (q - zp[:, :, None])
    return w.reshape(n, nb * block_size)[:, :k]
