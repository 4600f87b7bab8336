"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh 2023, arXiv 2301.00774).

Follows Algorithm 1 of the paper and the IST-DASLab reference ``SparseGPT.fasterprune``: walk the
columns left to right in blocks of B; inside a block pick the mask adaptively from w² / [H⁻¹]_jj²
(§3.3 "Adaptive mask selection"), zero the pruned weights and spread each column's OBS error over the
not-yet-visited columns of the block, then over all later columns in one matrix product
(§3.3 "lazy batch updates", as in GPTQ).
"""

from __future__ import annotations

import torch
from pydantic import PositiveFloat, PositiveInt

from llmopt.core.config import StrictModel
from llmopt.errors import LLMOptError
from llmopt.kernels.hessian import inverse_hessian_cholesky, prepare, weighted_error
from llmopt.kernels.pruning import (
    PruneResult,
    check_shapes,
    cumulative_quotas,
    lowest_k_mask,
    nm_mask,
    validate_sparsity,
)


class SparseGPTConfig(StrictModel):
    """SparseGPT's settings, validated once: the recipe's ``sparsegpt`` entry is this object (its stage
    config adds the sparsity, pattern and target fields) and the kernel receives it as it is."""

    block_size: PositiveInt = 128  # B: columns whose mask is chosen and updated together (§3.3, Alg. 1)
    damp: PositiveFloat = 0.01  # fraction of mean(diag H) added to diag H before inverting (§4 "dampening")


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    cfg: SparseGPTConfig = SparseGPTConfig(),  # noqa: B008 (frozen, immutable default)
) -> PruneResult:
    """Prune W to ``sparsity`` (or N:M) and update the kept weights to minimise ‖WX − ŴX‖².

    W: (out, in); H: (in, in) = 2 X Xᵀ / N from calibration inputs X: (in, N).
    Unstructured: in each (out × B) tile the lowest w²/U_jj² are pruned. The tile quotas come from
    ``cumulative_quotas``: round(s · out · B) for full tiles up to ±1, and they add up to exactly
    round(s · numel) even when the last tile is narrower than B. N:M: at the first column of each
    group of M, each row prunes its N lowest scores within the group, computed on the weights as
    updated so far (requires B % M == 0 so groups never straddle blocks).
    Dead input columns (diag H == 0) are zeroed and count as pruned first (score 0).
    ``loss`` = weighted_error(W, Ŵ, H) = tr((W − Ŵ) H (W − Ŵ)ᵀ).
    """
    check_shapes(W, H=H)
    rows, cols = W.shape
    validate_sparsity(sparsity, n_m, cols)
    if n_m is not None and cfg.block_size % n_m[1]:
        raise LLMOptError(
            f"SparseGPT block_size {cfg.block_size} is not a multiple of M={n_m[1]}; choose a block_size divisible by M"
        )
    W_orig, H_orig = W, H
    W, H, _dead = prepare(W, H)  # float32 copies; dead columns zeroed / unit diagonal
    U, _damp = inverse_hessian_cholesky(H, cfg.damp)  # (in, in) upper Cholesky of (H + λI)⁻¹
    B = cfg.block_size
    starts = list(range(0, cols, B))
    quotas = cumulative_quotas(sparsity, [rows * (min(i + B, cols) - i) for i in starts])
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)

    for i1, quota in zip(starts, quotas):
        i2 = min(i1 + B, cols)
        W1 = W[:, i1:i2].clone()  # (out, B) block being pruned
        U1 = U[i1:i2, i1:i2]  # (B, B)
        d1 = torch.diag(U1)  # (B,) U_jj; [H_F⁻¹]_jj = U_jj² for the columns not yet visited
        keep1 = keep[:, i1:i2]  # (out, B) view into keep
        Err1 = torch.zeros_like(W1)  # (out, B) OBS errors (w − ŵ) / U_jj
        if n_m is None:  # adaptive mask for the whole tile, chosen before any update (Alg. 1)
            keep1[:] = lowest_k_mask(W1**2 / d1[None, :] ** 2, quota)
        for j in range(i2 - i1):
            if n_m is not None and j % n_m[1] == 0:  # N:M: this group's mask, on the updated weights
                g = slice(j, j + n_m[1])
                keep1[:, g] = nm_mask(W1[:, g] ** 2 / d1[None, g] ** 2, *n_m)
            w = W1[:, j].clone()  # (out,)
            q = w * keep1[:, j]  # pruned → 0, kept unchanged
            err = (w - q) / d1[j]  # (out,)
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]  # OBS update of the rest of the block
            W1[:, j] = q  # exact zeros (the update above leaves rounding noise)
            Err1[:, j] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy update of all later columns: (out, B) @ (B, in − i2)

    return PruneResult(weight=W, mask=keep, loss=weighted_error(W_orig, W, H_orig))
