"""llama.cpp's choice of the K-quant parameters with mins (q2_K, q4_K, q5_K), ported bit for bit.

Ports of ``ggml-quants.c``: ``nearest_int``; ``make_qkx2_quants`` / ``make_qkx3_quants`` (a sub-block's
step and min: the weighted least-squares fit of value = scale·L + min over candidate inverse steps);
``make_qp_quants`` (the super-block's d and each sub-block's integer code for its step or min); and the rules
built from them, ``quantize_row_q{2,4,5}_K_ref`` (no importance) and ``quantize_row_q{2,4,5}_K_impl`` (with
an imatrix), returned as a :class:`KChoice` instead of bytes.

Each C function treats one block of n values with sequential loops; here the same loops run for all
blocks of a matrix at once. Arrays are element-major, (n, B) for B blocks, so the C loop over i is a loop over
rows and every sum accumulates in the C order (numpy's own reductions are pairwise: other roundings). All
arithmetic is numpy float32 in the order of the C expression, without FMA (libggml-base is compiled without
it), so every result equals llama.cpp's bit for bit. Integer codes are int32; where C stores one in a
``uint8_t`` it is wrapped to 0..255 as C does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F = np.float32
QK_K = 256
GROUP_MAX_EPS = F(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: float32 → int32 by adding 1.5·2²³ and reading the mantissa (round half to even
    inside its asserted range |v| ≤ 2²²−1; outside it, the same bits C gets)."""
    s = (np.asarray(v, dtype=F) + F(12582912.0)).view(np.int32)
    return (s & 0x007FFFFF) - 0x00400000


def csum(terms: np.ndarray, init: np.ndarray | None = None) -> np.ndarray:
    """Σ over axis 0 in order, as the C loop ``s += t[i]`` from ``s = init`` (default +0): (n, B) → (B,)."""
    acc = np.zeros(terms.shape[1:], F) if init is None else init.copy()
    for t in terms:
        acc += t
    return acc


def cmax(x: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """C's ``if (x[i] > m) m = x[i]`` over axis 0 from ``m = start`` (default 0): (n, B) → (B,)."""
    m = np.zeros(x.shape[1:], F) if start is None else start.copy()
    for t in x:
        m = np.where(t > m, t, m)
    return m


@dataclass(frozen=True)
class MinFit:
    """``make_qkx{2,3}_quants`` of B blocks: value = scale·L − the_min.

    scale, the_min: (B,) float32. L: (n, B) codes 0..nmax. iscale, origin: (B,) the inverse step and the min
    that produced L, L = clamp(nearest_int(iscale·(x − origin)), 0, nmax) (0, 0 for a flat block): llama.cpp
    keeps these codes where the sub-block's stored scale comes out 0, so the format carries them.
    """

    scale: np.ndarray
    the_min: np.ndarray
    L: np.ndarray
    iscale: np.ndarray
    origin: np.ndarray


def make_qkx_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> MinFit:
    """``make_qkx2_quants`` (and ``make_qkx3_quants``: the same loop; its ``max <= min`` test equals qkx2's
    ``max == min`` once min is clipped to ≤ 0) for blocks x, weights: (n, B) float32.

    Start from the range [min(x, 0), max(x)] with nmax steps; for is = 0..nstep try the inverse step
    (rmin + rdelta·is + nmax)/(max − min), fit scale and min to the codes by weighted least squares (min > 0
    clipped), keep it if its weighted error (|diff| with ``use_mad``, else diff²) is smaller. The min of the
    best fit so far is the origin of the next candidates' codes (state carried between steps, as in C).
    """
    n, B = x.shape
    mn = x[0].copy()
    mx = x[0].copy()
    for i in range(1, n):
        mn = np.where(x[i] < mn, x[i], mn)
        mx = np.where(x[i] > mx, x[i], mx)
    sum_w = csum(weights[1:], weights[0])
    sum_x = csum(weights[1:] * x[1:], weights[0] * x[0])
    mn = np.where(mn > 0, F(0), mn)
    flat = mx == mn

    buf = np.empty_like(x)  # (n, B) scratch: the full-size passes write into it

    def codes(iscale: np.ndarray, origin: np.ndarray) -> np.ndarray:
        """clamp(nearest_int(iscale·(x − origin)), 0, nmax) as float32 (codes 0..nmax are exact in float32)."""
        v = np.subtract(x, origin)
        v *= iscale
        v += F(12582912.0)  # nearest_int in place: the 1.5·2²³ trick
        L = v.view(np.int32)
        L &= 0x007FFFFF
        L -= 0x00400000
        return np.clip(L, 0, nmax, out=L).astype(F)

    def error(scale: np.ndarray, L: np.ndarray, the_min: np.ndarray) -> np.ndarray:
        diff = np.multiply(L, scale, out=buf)  # diff = scale·L + min − x
        diff += the_min
        diff -= x
        diff = np.abs(diff, out=diff) if use_mad else np.square(diff, out=diff)
        return csum(np.multiply(weights, diff, out=diff))

    with np.errstate(all="ignore"):
        iscale = F(nmax) / (mx - mn)
        best = error(F(1) / iscale, codes(iscale, mn), mn)
        scale, src_iscale, src_min = F(1) / iscale, iscale, mn
        for step in range(nstep + 1) if nstep >= 1 else ():
            isc = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)
            la = codes(isc, mn)
            wl = np.multiply(weights, la, out=buf)
            sum_l, sum_xl = csum(wl), csum(wl * x)
            sum_l2 = csum(np.multiply(wl, la, out=buf))
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clip = this_min > 0
            this_min = np.where(clip, F(0), this_min)
            this_scale = np.where(clip, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, la, this_min)
            win = (D > 0) & (cur < best) & ~flat
            best = np.where(win, cur, best)
            scale = np.where(win, this_scale, scale)
            src_iscale = np.where(win, isc, src_iscale)
            src_min = np.where(win, mn, src_min)
            mn = np.where(win, this_min, mn)
        zero = F(0)
        src_iscale, src_min = np.where(flat, zero, src_iscale), np.where(flat, zero, src_min)
        L = codes(src_iscale, src_min).astype(np.int32)  # the codes of the best candidate
    return MinFit(np.where(flat, zero, scale), -mn, L, src_iscale, src_min)


def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad) -> MinFit:
    """``make_qkx2_quants`` (the ``_ref`` rules' sub-block fit): :func:`make_qkx_quants`."""
    return make_qkx_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad)


def make_qkx3_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad) -> MinFit:
    """``make_qkx3_quants`` (the ``_impl`` rules' sub-block fit; weights None = x²): :func:`make_qkx_quants`."""
    return make_qkx_quants(x, x * x if weights is None else weights, nmax, rmin, rdelta, nstep, use_mad)


def make_qp_quants(x: np.ndarray, nmax: int, quant_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants``: a step d ≥ 0 and codes L ∈ 0..nmax for non-negative x (sub-block steps or mins),
    x, quant_weights: (n, B). Best of 9 inverse steps (nmax + 0.1·is)/max by weighted MSE, then up to 5 passes
    of coordinate descent on the codes, then d = Σw·x·L / Σw·L². Returns d (B,) and L (n, B) (uint8 values)."""
    n, B = x.shape
    mx = np.zeros(B, F)
    for t in x:
        mx = np.where(mx > t, mx, t)  # MAX(max, x[i])
    tiny = mx < GROUP_MAX_EPS
    qw = quant_weights
    with np.errstate(all="ignore"):
        iscale = F(nmax) / mx
        L = nearest_int(iscale * x) & 255
        diff = x - (F(1) / iscale) * L.astype(F)
        best = csum((qw * diff) * diff)
        for k in (-4, -3, -2, -1, 1, 2, 3, 4):
            isc = (F(0.1) * F(k) + F(nmax)) / mx
            diff = x - (F(1) / isc) * np.minimum(nearest_int(isc * x), nmax).astype(F)
            mse = csum((qw * diff) * diff)
            win = mse < best
            best = np.where(win, mse, best)
            iscale = np.where(win, isc, iscale)
        lq = np.minimum(nearest_int(iscale * x), nmax)
        L = lq & 255
        lf = lq.astype(F)
        sumlx, suml2 = csum((qw * x) * lf), csum((qw * lf) * lf)
        for _ in range(5):  # C stops a block after a pass without change: a further pass would change nothing
            for i in range(n):
                w, xi, li = qw[i], x[i], L[i].astype(F)
                slx = sumlx - (w * xi) * li
                sl2 = suml2 - (w * li) * li
                new = np.minimum(nearest_int((xi * sl2) / slx), nmax)
                nf = new.astype(F)
                slx_new = slx + (w * xi) * nf
                sl2_new = sl2 + (w * nf) * nf
                take = (slx > 0) & (sl2 > 0) & (new != L[i])
                take &= (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new
                L[i] = np.where(take, new & 255, L[i])
                sumlx = np.where(take, slx_new, sumlx)
                suml2 = np.where(take, sl2_new, suml2)
        d = np.where(suml2 > 0, sumlx / suml2, F(0))
    return np.where(tiny, F(0), d), np.where(tiny, 0, L)


def pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """q4_K / q5_K's 12 bytes of 8 scale and 8 min codes (uint8 values, (..., 8)), as the C quantizer packs
    them: bytes 0-3 / 4-7 the low 6 bits of codes 0-3, bytes 8-11 the low nibbles of codes 4-7, bits 6-7
    of bytes 0-7 the high 2 bits of codes 4-7. Codes above 63 spill as C's ``uint8_t`` stores do."""
    ls, lm = ls.astype(np.int32), lm.astype(np.int32)
    out = np.concatenate(
        [
            ls[..., :4] | (((ls[..., 4:] >> 4) << 6) & 255),
            lm[..., :4] | (((lm[..., 4:] >> 4) << 6) & 255),
            ((ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)) & 255,
        ],
        axis=-1,
    )
    return (out & 255).astype(np.uint8)


def get_scale_min_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7: the 12 bytes (..., 12) → scale codes, min codes (..., 8), 0..63."""
    q = q.astype(np.int32)
    lo, mid, hi = q[..., 0:4], q[..., 4:8], q[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, m


def fp16(a: np.ndarray) -> np.ndarray:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(a))``: round to fp16 (ties to even), back to float32."""
    return np.asarray(a, F).astype(np.float16).astype(F)


@dataclass(frozen=True)
class KChoice:
    """llama.cpp's parameters of S super-blocks with n sub-blocks each: ``d`` / ``dmin`` (S,) as stored (fp16
    values), ``sc`` / ``m`` (S, n) the sub-block scale and min codes as the dequantizer reads them, and the
    codes' search origin ``iscale`` / ``origin`` (S, n) (:class:`MinFit`), used where d·sc = 0."""

    d: np.ndarray
    dmin: np.ndarray
    sc: np.ndarray
    m: np.ndarray
    iscale: np.ndarray
    origin: np.ndarray


def _sub_blocks(x: np.ndarray, g: int) -> np.ndarray:
    """Super-blocks (S, 256) → their sub-blocks element-major, (g, S·256/g), blocks in (s, j) order."""
    return np.ascontiguousarray(x.reshape(-1, g).T)


def _choice(fit: MinFit, S: int, d, dmin, sc, m) -> KChoice:
    return KChoice(fp16(d), fp16(dmin), sc, m, fit.iscale.reshape(S, -1), fit.origin.reshape(S, -1))


def _importance(imatrix: np.ndarray, x: np.ndarray, g: int) -> np.ndarray:
    """The imatrix value of every weight of the sub-blocks of x: (S, 256) rows of width len(imatrix)."""
    per_row = x.shape[0] * QK_K // imatrix.shape[0]
    return np.tile(_sub_blocks(imatrix.reshape(-1, QK_K).astype(F), g), (1, per_row))


def quantize_row_q45_K_ref(x: np.ndarray, nmax: int) -> KChoice:
    """``quantize_row_q4_K_ref`` (nmax 15) / ``quantize_row_q5_K_ref`` (nmax 31) of super-blocks x: (S, 256).

    Per sub-block of 32: weights av_x + |x| (av_x = rms of the sub-block), ``make_qkx2_quants`` with
    rmin −1, 20 steps (q4_K) or −0.5, 15 steps (q5_K); the largest step and min of the super-block give
    d = fp16(max/63), dmin = fp16(max_min/63), and each sub-block's codes nearest_int(63·step/max) ≤ 63."""
    S = x.shape[0]
    xs = _sub_blocks(x, 32)  # (32, S·8)
    av_x = np.sqrt(csum(xs * xs) / F(32))
    rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
    fit = make_qkx2_quants(xs, av_x + np.abs(xs), nmax, rmin, 0.1, nstep, use_mad=False)
    scales, mins = fit.scale.reshape(S, 8), fit.the_min.reshape(S, 8)
    max_scale, max_min = cmax(scales.T), cmax(mins.T)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0))
        inv_min = np.where(max_min > 0, F(63) / max_min, F(0))
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 255, 63)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 255, 63)
    sc, m = get_scale_min_k4(pack_scales_k4(ls, lm))
    return _choice(fit, S, max_scale / F(63), max_min / F(63), sc, m)


def quantize_row_q45_K_impl(x: np.ndarray, nmax: int, imatrix: np.ndarray) -> KChoice:
    """``quantize_row_q4_K_impl`` / ``quantize_row_q5_K_impl`` with an imatrix (cols,), x: (S, 256) with rows
    of len(imatrix) weights. Weights imatrix·sqrt(σ² + x²) with σ² = 2·Σx²/256 over the super-block,
    ``make_qkx3_quants`` (rmin −0.9, 36 steps of 0.05), then ``make_qp_quants`` with nmax 63 gives d and the
    scale codes, and dmin and the min codes, each weighted by the sub-blocks' summed weights."""
    S = x.shape[0]
    sigma2 = (F(2) * csum(x.T * x.T)) / F(QK_K)  # (S,)
    xs = _sub_blocks(x, 32)
    weights = _importance(imatrix, x, 32) * np.sqrt(np.repeat(sigma2, 8) + xs * xs)
    sw = csum(weights).reshape(S, 8)
    fit = make_qkx3_quants(xs, weights, nmax, -0.9, 0.05, 36, use_mad=False)
    d, ls = make_qp_quants(fit.scale.reshape(S, 8).T, 63, sw.T)
    dmin, lm = make_qp_quants(fit.the_min.reshape(S, 8).T, 63, sw.T)
    if nmax == 31:  # only q5_K's impl clips the codes (MIN(63, ls)); q4_K stores them as they are
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    sc, m = get_scale_min_k4(pack_scales_k4(ls.T, lm.T))
    return _choice(fit, S, d, dmin, sc, m)


def quantize_row_q2_K_ref(x: np.ndarray) -> KChoice:
    """``quantize_row_q2_K_ref`` of super-blocks x: (S, 256). Per sub-block of 16: weights |x|,
    ``make_qkx2_quants`` (nmax 3, rmin −0.5, 15 steps of 0.1, absolute error); d = fp16(max_step/15) and
    dmin = fp16(max_min/15), codes nearest_int(15·step/max) in the low nibble, min codes in the high one."""
    S = x.shape[0]
    xs = _sub_blocks(x, 16)
    fit = make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = fit.scale.reshape(S, 16), fit.the_min.reshape(S, 16)
    max_scale, max_min = cmax(scales.T), cmax(mins.T)
    has_s, has_m = max_scale > 0, max_min > 0
    with np.errstate(divide="ignore"):
        ls = nearest_int(np.where(has_s, F(15) / max_scale, F(0))[:, None] * scales) & 255
        lm = nearest_int(np.where(has_m, F(15) / max_min, F(0))[:, None] * mins)
    b = np.where(has_s[:, None], ls, 0)
    b = np.where(has_m[:, None], b | ((lm << 4) & 255), b)
    d = np.where(has_s, max_scale / F(15), F(0))
    dmin = np.where(has_m, max_min / F(15), F(0))
    return _choice(fit, S, d, dmin, b & 0xF, b >> 4)


def quantize_row_q2_K_impl(x: np.ndarray, imatrix: np.ndarray) -> KChoice:
    """``quantize_row_q2_K_impl`` with an imatrix (cols,), x: (S, 256). Weights imatrix·sqrt(σ² + x²),
    σ² = Σx²/256 over the super-block; ``make_qkx3_quants`` (nmax 3, rmin −0.9, 36 steps of 0.05, squared
    error); ``make_qp_quants`` with nmax 15 gives d and the scale codes, dmin and the min codes."""
    S = x.shape[0]
    sigma2 = csum(x.T * x.T) / F(QK_K)
    xs = _sub_blocks(x, 16)
    weights = _importance(imatrix, x, 16) * np.sqrt(np.repeat(sigma2, 16) + xs * xs)
    sw = csum(weights).reshape(S, 16)
    fit = make_qkx3_quants(xs, weights, 3, -0.9, 0.05, 36, use_mad=False)
    d, ls = make_qp_quants(fit.scale.reshape(S, 16).T, 15, sw.T)
    dmin, lm = make_qp_quants(fit.the_min.reshape(S, 16).T, 15, sw.T)
    b = (ls.T | (lm.T << 4)) & 255
    return _choice(fit, S, d, dmin, b & 0xF, b >> 4)
