"""Which precision a distillation trains in: ``mixed_precision: auto`` is bfloat16 where the device
multiplies bfloat16 natively (:func:`llmopt.precision.native_bf16`), float32 elsewhere (see
:mod:`llmopt.distill.objective` for what runs in which)."""

from __future__ import annotations

import torch

from llmopt.precision import native_bf16


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` where :func:`~llmopt.precision.native_bf16`, else ``no``; other values as they are."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if native_bf16(device) else "no"
