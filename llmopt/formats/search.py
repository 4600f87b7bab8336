"""Scale search: the per-group parameters of ``QuantFormat.qparams`` with ``mse_grid`` > 0.

Candidates per group: the reference parameters, the range shrunk by 1 − i/``mse_grid`` (clipping, IST-DASLab
``find_params(mse=True)``), and weighted least-squares refits of the step for the codes a sweep of inverse
scales gives (llama.cpp ``make_qx_quants`` behind its importance-matrix quantization; for the asymmetric
grids the step and the offset are refitted together; :mod:`.refit`). Each group keeps the candidate with
the smallest Σ_j h_j (w_j − ŵ_j)², h = column importance (GPTQ passes diag H: the Hessian-weighted
search). All candidates of all groups are scored in one batched pass (chunked to bound memory), so the
search costs a few elementwise passes over W per candidate, not a Python loop per group.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from llmopt.formats.params import QParams
from llmopt.formats.refit import REFIT_STEPS

Tensor = torch.Tensor

MSE_MAX_SHRINK = 0.5  # clipping search: range factors 1 − i/grid for 0 < i < 0.5·grid (never below half the range)
SEARCH_CHUNK = 1 << 19  # elements of (candidates, rows, cols) scored at once (2 MiB per float32 temporary)


class SearchableFormat(Protocol):
    """What the search asks of a format (every :class:`~llmopt.formats.base.QuantFormat` has it)."""

    group_size: int | None

    def _range_params(self, Wg: Tensor, shrink: float | Tensor) -> QParams: ...

    def _refit_candidates(self, Wg: Tensor, imp: Tensor) -> QParams | None: ...

    def _fake(self, Wg: Tensor, qp: QParams) -> Tensor: ...


def search_qparams(fmt: SearchableFormat, W: Tensor, mse_grid: int, weight: Tensor | None = None) -> QParams:
    """The searched parameters of W: (rows, cols) float32, whose width ``fmt`` accepts → QParams (rows, n_groups).

    mse_grid > 0: the reference, the range shrunk by 1 − i/mse_grid for 0 < i < MSE_MAX_SHRINK·mse_grid,
    and the format's least-squares refits (``_refit_candidates``, which may also widen the range); per group
    the candidate with the smallest Σ_j weight_j (w_j − ŵ_j)² wins (weight: (cols,) column importance, e.g.
    diag(H), or (rows, cols) per-weight importance; None = plain MSE). The result rounds to the nearest grid
    point (:meth:`QParams.on_grid`) and is never worse than the reference under that error (the reference
    is candidate 0, ties keep it).
    """
    rows, cols = W.shape
    per_weight = weight is not None and weight.dim() == 2  # (rows, cols) importances, not one per column
    # Rows are independent: score them in slices, so no (candidates, rows, cols) temporary of the
    # search exceeds SEARCH_CHUNK elements (one 1536-wide Linear would take ~80 MiB at once).
    n_cands = math.ceil(MSE_MAX_SHRINK * mse_grid) + len(REFIT_STEPS)
    step = max(1, SEARCH_CHUNK // (cols * n_cands))
    if step < rows:
        # Each slice's parameters go straight into tensors made once for all rows. Kept as a list until one
        # concatenation, hundreds of small long-lived results interleaved with the slices' 2 MiB temporaries
        # and glibc's heap grew by ~0.5 MiB per slice instead of reusing them (~520 MiB over an 8192 x 2048 up_proj).
        out: list[Tensor | None] | None = None
        for r in range(0, rows, step):
            part = search_qparams(fmt, W[r : r + step], mse_grid, weight[r : r + step] if per_weight else weight)
            if out is None:
                out = [None if t is None else t.new_empty((*t.shape[:-2], rows, t.shape[-1])) for t in part.tensors()]
            for o, t in zip(out, part.tensors(), strict=True):
                if o is not None:
                    o[..., r : r + t.shape[-2], :].copy_(t)
        return QParams(*out)
    g = fmt.group_size or cols
    Wg = W.reshape(rows, cols // g, g)  # (rows, n_groups, g)
    if per_weight:
        imp = weight.detach().to(device=W.device, dtype=torch.float32).reshape(rows, cols // g, g)
    else:
        imp = torch.ones(cols) if weight is None else weight.detach().to(torch.float32).reshape(cols)
        imp = imp.to(W.device).reshape(1, cols // g, g)
    n_shrink = max(1, math.ceil(MSE_MAX_SHRINK * mse_grid))
    factors = 1 - torch.arange(n_shrink, dtype=torch.float32, device=W.device) / mse_grid  # 1.0 first
    cands = fmt._range_params(Wg, factors.view(-1, 1, 1)).on_grid()  # (C, rows, n_groups)
    refits = fmt._refit_candidates(Wg, imp)
    if refits is not None:
        cands = QParams.cat_candidates([cands, refits])
    return cands.take(search_errors(fmt, Wg, imp, cands).argmin(0))  # argmin: first minimum (ties: ref)


def search_errors(fmt: SearchableFormat, Wg: Tensor, imp: Tensor, cands: QParams) -> Tensor:
    """Σ_j imp_j (w_j − ŵ_j)² per candidate and group: (C, rows, n_groups), in chunks of candidates."""
    C = cands.scale.shape[0]
    step = max(1, SEARCH_CHUNK // Wg.numel())
    out = []
    for c0 in range(0, C, step):
        part = QParams(cands.scale[c0 : c0 + step], cands.zero[c0 : c0 + step]).grouped()
        err = fmt._fake(Wg, part).sub_(Wg)  # (c, rows, n_groups, g)
        out.append(err.square_().mul_(imp).sum(-1))
    return torch.cat(out)
