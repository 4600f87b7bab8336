"""Wanda: Pruning by Weights and activations (Sun et al. 2023, arXiv 2306.11695)."""

from __future__ import annotations

import torch

from llmopt.kernels.pruning import PruneResult, check_shapes, nm_mask, row_topk_mask, validate_sparsity


def wanda_prune(
    W: torch.Tensor, act_sq_norm: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None
) -> PruneResult:
    """Prune by the Wanda score S_ij = |W_ij| · ‖X_j‖₂ (paper Eq. 1), no weight update.

    W: (out, in); act_sq_norm: (in,) Σ_n x_nj² over the calibration tokens (so ‖X_j‖₂ is its root).
    Unstructured: the comparison group is each output row (paper §3, "comparison group"), every row
    prunes ≈ sparsity · in of its lowest scores; the per-row counts are split so the layer total is
    exactly round(sparsity · numel) (see ``row_topk_mask``). N:M: the N lowest scores in each group of
    M input columns of each row (paper §3 "Extension to N:M sparsity"; ``sparsity`` is then ignored).
    Input channels that never fired score 0 and are pruned first.

    ``loss`` = Σ_ij (W_ij − Ŵ_ij)² ‖X_j‖², the diagonal (channels-uncorrelated) estimate of ‖(W − Ŵ)X‖²_F
    that Wanda's score minimises; use ``hessian.weighted_error`` for the exact one.
    """
    check_shapes(W, act_sq_norm)
    validate_sparsity(sparsity, n_m, W.shape[1])
    W = W.detach().to(torch.float32)
    act_sq_norm = act_sq_norm.detach().to(device=W.device, dtype=torch.float32).clamp_min(0)  # (in,)
    score = W.abs() * act_sq_norm.sqrt()[None, :]  # (out, in)
    mask = nm_mask(score, *n_m) if n_m is not None else row_topk_mask(score, sparsity)
    W_hat = W * mask
    loss = float((((W - W_hat) ** 2) * act_sq_norm[None, :]).sum())
    return PruneResult(weight=W_hat, mask=mask, loss=loss)
