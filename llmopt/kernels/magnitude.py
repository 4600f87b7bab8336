"""Magnitude pruning: the data-free baseline (Han et al. 2015; the baseline of Wanda and SparseGPT)."""

from __future__ import annotations

import torch

from llmopt.kernels.pruning import PruneResult, check_shapes, layer_threshold_mask, nm_mask, validate_sparsity


def magnitude_prune(W: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None) -> PruneResult:
    """Prune the smallest |W_ij|.

    W: (out, in). Unstructured: one threshold for the whole matrix, exactly round(sparsity · numel)
    pruned. N:M: the N smallest |W| in each group of M consecutive input columns of every row
    (``sparsity`` is then ignored). ``loss`` is ‖W − Ŵ‖²_F (no calibration data is involved).
    """
    check_shapes(W)
    validate_sparsity(sparsity, n_m, W.shape[1])
    W = W.detach().to(torch.float32)
    score = W.abs()  # (out, in)
    mask = nm_mask(score, *n_m) if n_m is not None else layer_threshold_mask(score, sparsity)
    W_hat = W * mask
    return PruneResult(weight=W_hat, mask=mask, loss=float(((W - W_hat) ** 2).sum()))
