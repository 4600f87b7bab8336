"""Wanda: Pruning by Weights and activations (Sun et al. 2023, arXiv 2306.11695)."""

from __future__ import annotations

import torch

from llmopt.kernels.pruning import (
    PruneResult,
    check_shapes,
    n_pruned,
    nm_mask,
    row_quota_mask,
    row_topk_mask,
    topup_quotas,
    validate_sparsity,
)


def wanda_prune(
    W: torch.Tensor,
    act_sq_norm: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    prior: torch.Tensor | None = None,
) -> PruneResult:
    """Prune by the Wanda score S_ij = |W_ij| · ‖X_j‖₂ (paper Eq. 1), no weight update.

    W: (out, in); act_sq_norm: (in,) Σ_n x_nj² over the calibration tokens (so ‖X_j‖₂ is its root).
    Unstructured: the comparison group is each output row (paper §3, "comparison group"), every row
    prunes ≈ sparsity · in of its lowest scores; the per-row counts are split so the layer total is
    exactly round(sparsity · numel) (see ``row_topk_mask``). N:M: the N lowest scores in each group of
    M input columns of each row (paper §3 "Extension to N:M sparsity"; ``sparsity`` is then ignored).
    Input channels that never fired score 0 and are pruned first.

    ``prior`` (out, in) bool keep-mask, unstructured only (gradual pruning raises a mask step by step):
    the weights it prunes stay pruned and count toward the target, the layer ends with exactly
    round(sparsity · numel) pruned (or the prior's count, if more). Rows are topped up toward one common
    count (:func:`~llmopt.kernels.pruning.topup_quotas`); rows already above it keep their count, so a
    prior with uneven rows does not push the layer past the target as per-row quotas would.

    ``loss`` = Σ_ij (W_ij − Ŵ_ij)² ‖X_j‖², the diagonal (channels-uncorrelated) estimate of ‖(W − Ŵ)X‖²_F
    that Wanda's score minimises; use ``hessian.weighted_error`` for the exact one.
    """
    check_shapes(W, act_sq_norm)
    validate_sparsity(sparsity, n_m, W.shape[1])
    W = W.detach().to(torch.float32)
    act_sq_norm = act_sq_norm.detach().to(device=W.device, dtype=torch.float32).clamp_min(0)  # (in,)
    score = W.abs() * act_sq_norm.sqrt()[None, :]  # (out, in)
    if prior is not None:
        if n_m is not None:
            raise ValueError("wanda_prune: prior is for unstructured sparsity only")
        prior = prior.to(device=W.device, dtype=torch.bool)
        score = torch.where(prior, score, -1.0)  # already pruned: first in their row, whatever the ties
        q = topup_quotas((~prior).sum(1), n_pruned(sparsity, W.numel()))  # (out,)
        mask = row_quota_mask(score, q)
    else:
        mask = nm_mask(score, *n_m) if n_m is not None else row_topk_mask(score, sparsity)
    W_hat = W * mask
    loss = float((((W - W_hat) ** 2) * act_sq_norm[None, :]).sum())
    return PruneResult(weight=W_hat, mask=mask, loss=loss)
