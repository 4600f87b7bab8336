"""Whether a device multiplies bfloat16 natively: what the distillation (``mixed_precision: auto``), the
structured stage's refinement and the time estimates decide their compute dtype by."""

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
