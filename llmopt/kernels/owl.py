"""OWL: Outlier Weighed Layerwise sparsity (Yin et al. 2024, arXiv 2310.05175).

Layers whose Wanda scores hold more outliers are pruned less (§4 "Layerwise Outlier Distribution",
Eq. for S_l). Two steps: measure each decoder layer's outlier ratio, then map the ratios to per-layer
sparsities around the global target.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from llmopt.errors import LLMOptError

log = logging.getLogger(__name__)


def _outlier_count(scores: list[torch.Tensor], m: float) -> tuple[int, int]:
    flat = torch.cat([s.flatten().to(torch.float64) for s in scores])  # (Σ numel,)
    return int((flat > m * flat.mean()).sum()), flat.numel()


def outlier_ratio(W: torch.Tensor, act_norm: torch.Tensor, m: float = 5.0) -> float:
    """Fraction of Wanda scores |W_ij|·‖X_j‖₂ greater than m · mean(score) (OWL's LOD with M = m).

    W: (out, in); act_norm: (in,) ‖X_j‖₂ (the root of Wanda's ``act_sq_norm``).
    """
    return layer_outlier_ratio([(W, act_norm)], m)


def layer_outlier_ratio(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], m: float = 5.0) -> float:
    """Outlier ratio of a whole decoder layer: the scores of all its Linears pooled, as in OWL's code.

    pairs: [(W (out, in), act_norm (in,)), …] for every pruned Linear of the layer.
    """
    if not pairs:
        raise ValueError("layer_outlier_ratio needs at least one (W, act_norm) pair")
    scores = [W.detach().abs().float() * a.detach().float().to(W.device)[None, :] for W, a in pairs]
    count, total = _outlier_count(scores, m)
    return count / total


def owl_sparsities(layer_outlier_ratios: list[float], target: float, lam: float = 0.08) -> list[float]:
    """Per-layer sparsities S_l from outlier ratios D_l: more outliers → lower sparsity (OWL §4).

    1. Map D linearly onto [target − λ, target + λ], the layer with most outliers to target − λ
       (reference code: min-max normalise D to [0, 2λ]).
    2. Shift so that mean(S) == target, i.e. the model keeps the global sparsity.
    3. The shift can push a layer outside target ± λ (the reference code allows this; the paper states
       S_l ∈ [S − λ, S + λ]); deviations from the mean are then shrunk uniformly, which keeps the
       mean, the order and the linear mapping.
    λ is first reduced to min(λ, target, 1 − target − 0.001) (logged) so every S_l lies in [0, 1) and
    no clipping is needed: the mean stays exactly ``target``. Equal ratios give the uniform target.
    """
    if not 0.0 <= target < 1.0:
        raise LLMOptError(f"OWL target sparsity is {target}; use a value in [0, 1), e.g. 0.5")
    if not lam >= 0.0:
        raise LLMOptError(f"OWL lambda is {lam}; use a non-negative sparsity spread, e.g. 0.08")
    if not layer_outlier_ratios:
        raise ValueError("owl_sparsities needs at least one layer")
    lam_eff = max(0.0, min(lam, target, 1.0 - target - 1e-3))
    if lam_eff < lam:
        log.warning("OWL lambda %g reduced to %g to keep sparsities in [0, 1) around %g", lam, lam_eff, target)
    D = torch.tensor(layer_outlier_ratios, dtype=torch.float64)  # (L,)
    spread = D.max() - D.min()
    if spread == 0 or lam_eff == 0:
        return [target] * len(layer_outlier_ratios)
    S = target + lam_eff - 2 * lam_eff * (D - D.min()) / spread  # (L,) in [target − λ, target + λ]
    dev = S - S.mean()  # deviations around the mean; S := target + dev has mean exactly target
    dev = dev * min(1.0, lam_eff / float(dev.abs().max()))
    S = (target + dev).clamp(0.0, 1.0 - 1e-9)  # a no-op guard against rounding at the edges
    return S.tolist()
