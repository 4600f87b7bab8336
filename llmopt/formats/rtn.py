"""Round-to-nearest quantization (RTN): each weight on its own group's grid, no error feedback."""

from __future__ import annotations

import math

import torch

from llmopt.formats.base import QuantFormat
from llmopt.formats.params import QuantResult
from llmopt.kernels.hessian import weighted_error

Tensor = torch.Tensor


def rtn_quantize(
    W: Tensor, fmt: QuantFormat, mse_grid: int = 0, weight: Tensor | None = None, H: Tensor | None = None
) -> QuantResult:
    """Round-to-nearest: per-group params from ``fmt.qparams`` then each weight on its own grid.

    W: (out, in). With mse_grid = 0 a GGUF format reproduces ``gguf.quants.quantize`` byte for byte.
    H: optional (in, in) Hessian for ``loss`` = tr((W − Ŵ) H (W − Ŵ)ᵀ) (nan without it).
    """
    W = W.detach().to(torch.float32)
    qp = fmt.qparams(W, mse_grid=mse_grid, weight=weight)
    codes = fmt.quantize(W, qp)
    W_hat = fmt.dequantize(codes, qp)
    loss = weighted_error(W, W_hat, H) if H is not None else math.nan
    return QuantResult(codes=codes, qparams=qp, weight=W_hat, loss=loss)
