"""Elementwise tensor helpers shared by the formats: fp16 rounding, C ``roundf`` and division by scales
that may be 0 (an all-zero group has d = 0)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def fp16(t: Tensor) -> Tensor:
    """Round to the nearest fp16 value (ties to even, as numpy's astype), kept in float32."""
    return t.to(torch.float16).to(torch.float32)


def safe_inverse(d: Tensor) -> Tensor:
    """1/d with 0 where d == 0 (ggml: ``id = d ? 1.0f/d : 0.0f``)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def safe_div(x: Tensor, d: Tensor) -> Tensor:
    """x / d, with 0 where d == 0."""
    return torch.where(d == 0, torch.zeros_like(x), x / torch.where(d == 0, torch.ones_like(d), d))


def round_half_away(x: Tensor) -> Tensor:
    """C ``roundf``: round half away from zero, with gguf-py's exact float32 formula (``np_roundf``)."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def sqrtf(x: Tensor) -> Tensor:
    """C ``sqrtf`` of float32 values, correctly rounded: through float64 (exact for every float32 input).
    torch's float32 ``sqrt`` on AVX-512 CPUs is off by one ulp for ~15% of inputs, which moved about one
    block in a thousand of llama.cpp's imatrix-weighted fits (``qw·sqrtf(σ² + x²)``)."""
    return torch.sqrt(x.double()).float()
