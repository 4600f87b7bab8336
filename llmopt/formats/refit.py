"""Weighted least-squares refits: the best step (and offset) of a group for fixed codes.

The scale search (:mod:`.search`) offers, beside the reference and the shrunk ranges, refits in the style
of llama.cpp's ``make_qx_quants`` (behind its importance-matrix quantization): a sweep of inverse scales
(``REFIT_STEPS``) gives codes l, then the step d (:func:`lsq_step`), or for asymmetric grids the step and
the offset together (:func:`lsq_affine`), are solved for those codes under the column importance. Each
format builds its candidates from these in its ``_refit_candidates``.
"""

from __future__ import annotations

import torch

from llmopt.formats.numeric import safe_div

Tensor = torch.Tensor

REFIT_STEPS = (-6, -4, -2, -1, 0, 1, 2, 4, 6)  # refit sweep: inverse scales (r + k/10)/max, k in REFIT_STEPS


def lsq_step(Wg: Tensor, l: Tensor, imp: Tensor) -> Tensor:
    """Best step d for fixed codes l: argmin_d Σ_j imp_j (w_j − d·l_j)² = Σ imp·w·l / Σ imp·l².

    Wg, l: (..., rows, n_groups, g); imp: (1, n_groups, g). Returns (..., rows, n_groups).
    """
    return safe_div((l * (imp * Wg)).sum(-1), (l * l).mul_(imp).sum(-1))


def lsq_affine(Wg: Tensor, l: Tensor, imp: Tensor) -> tuple[Tensor, Tensor]:
    """Best (d, m) for fixed codes l: argmin Σ_j imp_j (w_j − d·l_j − m)², the 2×2 normal equations.

    Wg, l: (..., rows, n_groups, g); imp: (1, n_groups, g). Returns d, m: (..., rows, n_groups); where the
    system is singular (all codes equal) d = 0 and m = the weighted mean.
    """
    s0, s1, s2 = imp.sum(-1), (imp * l).sum(-1), (imp * l * l).sum(-1)
    t0, t1 = (imp * Wg).sum(-1), (imp * Wg * l).sum(-1)
    det = s0 * s2 - s1 * s1
    ok = det > 1e-12 * s0 * s2
    d = torch.where(ok, safe_div(s0 * t1 - s1 * t0, det), torch.zeros_like(det))
    m = torch.where(ok, safe_div(s2 * t0 - s1 * t1, det), safe_div(t0, s0))
    return d, m
