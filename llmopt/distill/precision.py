"""Which precision a distillation trains in: ``mixed_precision: auto`` is bfloat16 where the device
multiplies bfloat16 natively, float32 elsewhere (see :mod:`llmopt.distill.objective` for what runs in which)."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """bfloat16 matmuls run natively (faster than float32): AVX512-BF16 or AMX on a CPU, a CUDA GPU with
    bfloat16 support. Without them oneDNN emulates bfloat16, slower than float32."""
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return False


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` where :func:`native_bf16`, else ``no``; other values as they are."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if native_bf16(device) else "no"
