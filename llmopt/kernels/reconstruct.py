"""Reconstruction after a structured cut: least-squares refits of the Linears that lost input columns
(or whose inputs changed), so each keeps its calibration outputs. Pure functions on tensors.

The layer-wise objective is GPTQ's / SparseGPT's, min ‖W′ X_s − Y‖² over the calibration tokens, with
X_s (in_s, N) the *cut* model's inputs of the Linear and Y the target outputs (the uncut model's
``W X_t``, plus an optional correction ``e``). Its normal equations need only sums over tokens:

    H = Σ x_s x_sᵀ (in_s, in_s),  C = Σ x_s x_tᵀ (in_s, in_t),  E = Σ x_s eᵀ (in_s, out)
    W′ = (W Cᵀ + Eᵀ) (H + λI)⁻¹,  λ = damp · mean(diag H)   (GPTQ's damping)

With the same inputs minus some columns (x_s = x_t[keep]), C = H_t[keep, :] and this is the OBS update
for removing whole input columns (ZipLM, Kurtic et al. 2023, eq. 3; SlimGPT, Ling et al. 2024, §3.1):
δW_keep = −W_R [H⁻¹]_RR⁻¹ [H⁻¹]_R,keep, i.e. W′ = W H[:, keep] H[keep, keep]⁻¹ (block inversion; tested).
Feeding the cut model's own activations forward (x_s ≠ x_t[keep]) makes each refit also absorb the
error of everything cut before it (the "sequential" variant of both papers, GPTAQ's asymmetric target).
"""

from __future__ import annotations

import torch


def _damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.to(torch.float64).clone()
    mean = H.diagonal().mean()
    H.diagonal().add_(damp * mean if mean > 0 else 1.0)  # a column that never fired gets weight 0
    return H


def refit(
    W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, E: torch.Tensor | None = None, damp: float = 0.01
) -> torch.Tensor:
    """The least-squares weight (out, in_s) mapping the cut inputs onto ``W X_t (+ e)``: (W Cᵀ + Eᵀ)(H + λI)⁻¹.

    W: (out, in_t) target weight; H: (in_s, in_s); C: (in_s, in_t); E: (in_s, out) or None. float64 inside."""
    B = C.to(torch.float64) @ W.to(torch.float64).t()  # (in_s, out) = Σ x_s yᵀ
    if E is not None:
        B += E.to(torch.float64)
    L = torch.linalg.cholesky(_damped(H, damp))
    return torch.cholesky_solve(B, L).t().to(W.dtype).contiguous()


def drop_columns(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """OBS removal of the input columns not in ``keep`` (same inputs otherwise): W H[:, keep] H[keep, keep]⁻¹."""
    return refit(W, H[keep][:, keep], H[keep], damp=damp)


def fit_gain(
    E_s: torch.Tensor, E_t: torch.Tensor, U: torch.Tensor, C: torch.Tensor, damp: float = 0.01
) -> torch.Tensor:
    """The RMSNorm weight g (in_s,) of a final norm whose output ``g ∘ u`` feeds a fixed output matrix
    ``E_s`` (V, in_s) (a tied embedding cannot be refitted), fitted to the uncut logits ``E_t x_t``:
    min_g Σ ‖E_s (g ∘ u) − E_t x_t‖², with U = Σ u uᵀ and C = Σ u x_tᵀ. Its normal equations are
    ((E_sᵀE_s) ∘ U) g = rowsum((E_sᵀE_t) ∘ C) (∘: elementwise)."""
    Es, Et = E_s.to(torch.float64), E_t.to(torch.float64)
    A = (Es.t() @ Es) * U.to(torch.float64)
    b = ((Es.t() @ Et) * C.to(torch.float64)).sum(1)
    L = torch.linalg.cholesky(_damped(A, damp))
    return torch.cholesky_solve(b[:, None], L)[:, 0].to(E_s.dtype)
