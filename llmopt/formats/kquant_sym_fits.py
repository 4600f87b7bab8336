"""llama.cpp's scale searches behind the symmetric K-quants q6_K and q3_K, ported bit for bit.

Ports of ``ggml-quants.c``: ``nearest_int``, ``make_qx_quants`` (``rmse_type`` 1, with and without weights),
``make_q3_quants`` (``do_rmse`` true), and the super-block rules of ``quantize_row_q6_K_ref`` /
``quantize_row_q6_K_impl`` and ``quantize_row_q3_K_ref`` / ``quantize_row_q3_K_impl``: how each 16-weight
sub-block's float scale is found and how the 16 scales of a super-block become integer codes under one fp16
``d``. :mod:`.kquant_sym` turns the result into :class:`~llmopt.formats.params.QParams` and GGUF bytes.

Every search is vectorised over all sub-blocks of a matrix (the leading dim N below) but keeps C's float32
arithmetic: the same products in the same order, and each C sum ``s += t`` as an explicit loop over the 16
(or 256) terms, since torch's reductions add pairwise. libggml-base is built without FMA contraction, so
plain IEEE float32 operations reproduce it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmopt.formats.numeric import fp16, sqrtf

Tensor = torch.Tensor

GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml-quants.c: a group with max |x| below it is all zero
SUB = 16  # weights per sub-block of q6_K and q3_K
QK_K = 256  # weights per super-block
# make_qx_quants's trial steps nmax + 0.1f·is, is = −9..9 without 0, in C's float32
_TRIALS = [i for i in range(-9, 10) if i != 0]


def nearest_int(v: Tensor) -> Tensor:
    """ggml's ``nearest_int`` of float32 v: the low mantissa bits of v + 1.5·2²³ (int32; round half to even
    for |v| < 2²², and the same bits as C beyond, where ggml only asserts)."""
    return (v + 12582912.0).view(torch.int32).bitwise_and_(0x7FFFFF).sub_(0x400000)


def _signed_amax(x: Tensor) -> tuple[Tensor, Tensor]:
    """(max, amax) of each row of x (N, n): the first value of largest |x| (C's ``if (ax > amax)`` walk) and
    its magnitude, both (N, 1)."""
    i = x.abs().argmax(-1, keepdim=True)  # torch's argmax returns the first maximal index
    mx = x.gather(-1, i)
    return mx, mx.abs()


def _trial_steps(nmax: int) -> Tensor:
    """(19, 1) float32: nmax, then nmax + 0.1f·is for is = −9..−1, 1..9 (C's float32 arithmetic)."""
    steps = [np.float32(nmax)] + [np.float32(nmax) + np.float32(0.1) * np.float32(i) for i in _TRIALS]
    return torch.tensor(np.array(steps, dtype=np.float32)).view(-1, 1)


def _sums(wx: Tensor, w: Tensor, l: Tensor) -> tuple[Tensor, Tensor]:
    """C's sequential ``sumlx += w·x·l; suml2 += w·l·l`` over the first dim, terms first: wx, w (n, N),
    l (n, ..., N) → two (..., N)."""
    sumlx = torch.zeros(l.shape[1:])
    suml2 = torch.zeros(l.shape[1:])
    for i in range(l.shape[0]):
        sumlx += wx[i] * l[i]  # no fused multiply-add: C rounds the product first
        suml2 += (w[i] * l[i]).mul_(l[i])
    return sumlx, suml2


@dataclass(frozen=True)
class QxFit:
    """``make_qx_quants``'s answer per row: scale (N,), codes L (N, n) = l + nmax (int32, 0 for an all-zero
    row), and iscale (N,), the inverse scale L was rounded with (NaN for an all-zero row)."""

    scale: Tensor
    L: Tensor
    iscale: Tensor


def make_qx_quants(x: Tensor, nmax: int, qw: Tensor | None = None) -> QxFit:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` on every row of x: (N, n) float32.

    Codes l = clamp(nearest_int(iscale·x), −nmax, nmax−1) for iscale = −nmax/max and −(nmax + 0.1·is)/max,
    is = −9..9; the weighted least-squares scale Σw·x·l / Σw·l² of the first trial, replaced by a later
    trial's when it explains more (sumlx² > best·suml2). Weights qw (N, n), or x² when None.
    """
    mx, amax = _signed_amax(x)
    xt = x.t().contiguous()  # (n, N): terms first, so each step of C's sums is a contiguous slice
    wt = xt * xt if qw is None else qw.t().contiguous()
    wxt = wt * xt
    iscale = -_trial_steps(nmax) / mx[:, 0]  # (19, N): −(nmax + 0.1f·is) / max
    # nearest_int as a float: |iscale·x| ≤ nmax + 0.9, where adding 1.5·2²³ rounds half to even exactly
    l = (iscale * xt[:, None, :]).add_(12582912.0).sub_(12582912.0).clamp_(-nmax, nmax - 1)  # (n, 19, N)
    sumlx, suml2 = _sums(wxt, wt, l)  # (19, N)
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], torch.zeros_like(suml2[0]))
    best = scale * sumlx[0]
    pick = torch.zeros(x.shape[0], dtype=torch.long)
    for k in range(1, len(_TRIALS) + 1):  # in C's order: each trial is compared with the best so far
        better = (suml2[k] > 0) & (sumlx[k] * sumlx[k] > best * suml2[k])
        new = sumlx[k] / suml2[k]
        scale = torch.where(better, new, scale)
        best = torch.where(better, new * sumlx[k], best)
        pick = torch.where(better, k, pick)
    rows = torch.arange(x.shape[0])
    zero = amax[:, 0] < GROUP_MAX_EPS  # all zero: L = 0, scale 0
    L = torch.where(zero[:, None], 0, l[:, pick, rows].t().to(torch.int32) + nmax)
    chosen = torch.where(zero, torch.nan, iscale[pick, rows])
    return QxFit(torch.where(zero, 0.0, scale), L, chosen)


def make_q3_quants(x: Tensor, nmax: int = 4) -> tuple[Tensor, Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on every row of x: (N, n) float32 → (scale (N,), L (N, n)
    int32 codes l + nmax, 0 for an all-zero row).

    Codes from iscale = −nmax/max, then up to 5 sweeps of coordinate descent under weights x²: each code in
    turn moves to nearest_int(x·Σ'w·l² / Σ'w·x·l) (the sums without it) when that raises (Σw·x·l)² / Σw·l².
    A row whose sweep changes nothing stays unchanged in later sweeps, so sweeping all rows 5 times (stopping
    when none changes) equals C's per-row ``break``.
    """
    mx, amax = _signed_amax(x)
    xt = x.t().contiguous()  # (n, N) terms first
    iscale = -float(nmax) / mx[:, 0]  # (N,)
    L = nearest_int(iscale * xt).clamp_(-nmax, nmax - 1).to(torch.float32)  # (n, N)
    w = xt * xt
    wx = w * xt
    sumlx, suml2 = _sums(wx, w, L)
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(L.shape[0]):
            Li = L[i]
            slx = sumlx - wx[i] * Li  # the sums without code i
            sl2 = suml2 - (w[i] * Li) * Li
            new = nearest_int(xt[i] * sl2 / slx).clamp_(-nmax, nmax - 1).to(torch.float32)
            take = (slx > 0) & (new != Li)
            slx = slx + wx[i] * new  # ... with the new code
            sl2 = sl2 + (w[i] * new) * new
            take &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(take, new, Li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    zero = amax[:, 0] < GROUP_MAX_EPS
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    L = torch.where(zero[:, None], 0, L.t().to(torch.int32) + nmax)
    return torch.where(zero, 0.0, scale), L


@dataclass(frozen=True)
class SuperBlockFit:
    """What a ``quantize_row_*`` rule stores per super-block, for x: (R, nb, 256).

    d:      (R, nb) the fp16 super-block scale (float32 holding an fp16 value).
    sc:     (R, nb, 16) the sub-block scale codes as stored (q6_K: int8 −128..127; q3_K: 0..63, offset 32).
    iscale: (R, nb, 16) the first pass's inverse scale per sub-block (its codes are what llama.cpp keeps
            where d·sc is 0), NaN where those codes are 0 or (q3_K ref) come from ``make_q3_quants``.
    """

    d: Tensor
    sc: Tensor
    iscale: Tensor


def _max_scale(scales: Tensor) -> Tensor:
    """The sub-block scale of largest magnitude of each super-block (first one on ties): (R, nb, 16) → (R, nb)."""
    return scales.gather(-1, scales.abs().argmax(-1, keepdim=True)).squeeze(-1)


def q6_K_fit(x: Tensor, imatrix: Tensor | None) -> SuperBlockFit:
    """``quantize_row_q6_K_ref`` (imatrix None) / ``quantize_row_q6_K_impl`` on x: (R, nb, 256).

    Per sub-block make_qx_quants(16, 32) weighted by x² or by the imatrix itself (qw, not qw·sqrt(σ² + x²):
    the impl's weighted line is commented out); iscale = −128/max_scale, d = fp16(1/iscale),
    sc = min(127, nearest_int(iscale·scale)). A super-block whose largest scale is below GROUP_MAX_EPS is
    all zero bytes.
    """
    R, nb, _ = x.shape
    qw = None if imatrix is None else imatrix.view(1, nb, QK_K).expand(R, nb, QK_K).reshape(-1, SUB)
    fit = make_qx_quants(x.reshape(-1, SUB), 32, qw)
    scales = fit.scale.view(R, nb, SUB)
    max_scale = _max_scale(scales)
    zeroed = max_scale.abs() < GROUP_MAX_EPS
    iscale = -128.0 / max_scale
    d = fp16(1.0 / iscale)
    sc = nearest_int(iscale[..., None] * scales).clamp_(max=127).to(torch.float32)
    z = zeroed[..., None]
    return SuperBlockFit(
        torch.where(zeroed, 0.0, d),
        torch.where(z, 0.0, sc),
        torch.where(z, torch.nan, fit.iscale.view(R, nb, SUB)),
    )


def q3_K_fit(x: Tensor, imatrix: Tensor | None) -> SuperBlockFit:
    """``quantize_row_q3_K_ref`` (imatrix None) / ``quantize_row_q3_K_impl`` on x: (R, nb, 256).

    ref: per sub-block make_q3_quants(16, 4); iscale = −32/max_scale, sc = clamp(nearest_int(iscale·scale),
    −32, 31) + 32, d = fp16(1/iscale); all scales 0 → d = 0 and sc = 0.
    impl: weights qw·sqrt(σ² + x²), σ² = 2·Σx²/256 over the super-block; per sub-block make_qx_quants(16, 4)
    under them, then the 16 scales themselves by make_qx_quants(16, 32) weighted by each sub-block's Σ weights:
    sc = its codes, d = fp16(its scale).
    """
    R, nb, _ = x.shape
    xs = x.reshape(-1, SUB)
    if imatrix is None:
        scales = make_q3_quants(xs, 4)[0].view(R, nb, SUB)
        max_scale = _max_scale(scales)
        iscale = -32.0 / max_scale
        sc = (nearest_int(iscale[..., None] * scales).clamp_(-32, 31) + 32).to(torch.float32)
        d = fp16(1.0 / iscale)
        zero = max_scale == 0
        return SuperBlockFit(
            torch.where(zero, 0.0, d), torch.where(zero[..., None], 0.0, sc), torch.full_like(sc, torch.nan)
        )
    xb = x.reshape(R * nb, QK_K)
    sumx2 = torch.zeros(R * nb)
    for j in range(QK_K):
        sumx2 = sumx2 + xb[:, j] * xb[:, j]
    sigma2 = (2 * sumx2 / QK_K).view(R, nb, 1)
    # sqrtf is correctly rounded; torch's vectorised float32 sqrt is not, the float64 one rounded to float32 is
    weight = imatrix.view(1, nb, QK_K) * sqrtf(sigma2 + x * x)  # (R, nb, 256)
    weight = weight.reshape(-1, SUB)
    sw = torch.zeros(weight.shape[0])
    for l in range(SUB):
        sw = sw + weight[:, l]
    fit = make_qx_quants(xs, 4, weight)
    block = make_qx_quants(fit.scale.view(-1, SUB), 32, sw.view(-1, SUB))  # (R·nb) rows of 16 scales
    return SuperBlockFit(
        fp16(block.scale).view(R, nb), block.L.to(torch.float32).view(R, nb, SUB), fit.iscale.view(R, nb, SUB)
    )
