"""llama.cpp's 4-bit non-linear formats: ``iq4_nl`` (GGUF IQ4_NL) and ``iq4_xs`` (GGUF IQ4_XS).

Both code a weight as an index q ∈ 0..15 into the fixed grid ``kvalues_iq4nl`` (ggml-common.h)
{−127, −104, −83, −65, −49, −35, −22, −10, 1, 13, 25, 38, 53, 69, 89, 113}, scaled per block of 32:

* iq4_nl: value = d·kvalues[q], one fp16 d per block of 32.
  ``block_iq4_nl`` {ggml_half d; uint8 qs[16]}: 18 bytes per 32 weights (4.5 bits).
* iq4_xs: super-blocks of 256 (8 sub-blocks of 32), value = d·(ls − 32)·kvalues[q], fp16 d per super-block
  and a 6-bit code ls per sub-block. ``block_iq4_xs`` {ggml_half d; uint16 scales_h; uint8 scales_l[4];
  uint8 qs[128]}: 136 bytes per 256 weights (4.25 bits); ls's 4 low bits are nibble ib%2 of scales_l[ib/2],
  its 2 high bits are bits 2·ib, 2·ib+1 of scales_h. A row that is not a multiple of 256 is written as
  iq4_nl by llama.cpp.

In both, qs[16·i + j] = q[32·i + j] | q[32·i + 16 + j] << 4.

``qparams`` ports llama.cpp's quantizer as ``ggml_quantize_chunk`` runs it (ggml-quants.c:
``quantize_iq4_nl``, ``quantize_iq4_xs``, both ``quantize_row_iq4_nl_impl`` with ntry = 7, and
``best_index_int8``), with and without an importance matrix, in IEEE float32 with C's sequential sums, so
the bytes are llama.cpp's. Per block of 32: the weights of the fit are x² (no imatrix) or
imatrix·sqrt(σ² + x²) (σ² = 2·mean x² of the super-block); the scale starts at max/127 (max = the signed
weight of largest magnitude), the codes are the nearest grid points of x·(1/d), and d is refitted by weighted
least squares Σwqx/Σwq²; then 15 more inverse scales (−127 + t)/max, t = −7..7, each with its refitted d,
and the one maximising (Σwqx)²/Σwq² wins. iq4_nl stores fp16(d); iq4_xs quantizes the 8 sub-block scales
against the super-block d = −max_scale/32 to ls − 32 = round(scale/d) ∈ −32..31. The final codes are
``best_index_int8`` of x times the *unrounded* inverse scale (iq4_nl 1/d, iq4_xs 1/(d·(ls − 32))): that
inverse rides in ``QParams.ref_inv_scale``, which :meth:`QParams.on_grid` drops, so GPTQ rounds each weight
to the nearest point of the stored grid instead.

QParams: ``scale`` = the effective per-group multiplier as ggml dequantizes it (iq4_nl: fp32(d); iq4_xs:
fp32(d)·(ls − 32)), ``zero`` zeros (unused); iq4_xs also ``scale_code`` = ls (0..63, as stored) and
``super_scale`` = fp32(d) of the group's super-block. Codes are the grid indices 0..15.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from llmopt.errors import LLMOptError
from llmopt.formats.ggml_legacy import _GGUFBlockFormat
from llmopt.formats.numeric import fp16, safe_div, safe_inverse, sqrtf
from llmopt.formats.params import QParams
from llmopt.formats.superblock import QK_K, SuperBlockFormat

Tensor = torch.Tensor

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml-common.h
BLOCK = 32  # QK4_NL; also the iq4_xs sub-block
NTRY = 7  # what quantize_iq4_nl / _xs pass (quantize_row_iq4_nl_ref's −1 is not what llama-quantize runs)
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a block with max|x| below it gets scale 0
CHUNK = 1 << 21  # weights whose parameters are chosen at once (bounds the (blocks, 32) temporaries)


def _grid(device: torch.device) -> tuple[Tensor, Tensor]:
    """kvalues_iq4nl as float32 (16,) and the 15 midpoints between neighbours (multiples of 1/2), on ``device``."""
    kv = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=device)
    return kv, (kv[1:] + kv[:-1]) / 2


def grid_index(x: Tensor) -> Tensor:
    """``best_index_int8(16, kvalues_iq4nl, x)`` elementwise: x float32 (any shape) → int64 indices 0..15.

    C's binary search ends at mu = #{values ≤ x} (clamped to 1..15) and takes mu − 1 if x − val[mu−1] <
    val[mu] − x in float32, else mu. That is the number of midpoints m ≤ x (the nearest value, a tie going
    up), which is what this returns: the two differences are exact wherever they could compare otherwise
    (x within an ulp of a midpoint has the exponent of x − val[mu−1] and of val[mu] − x, or a larger one,
    and x − integer is then a multiple of x's ulp), so C's float32 comparison is the exact one."""
    return torch.bucketize(x, _grid(x.device)[1], right=True)


def _value_table(device: torch.device) -> Tensor:
    """kvalues[grid_index(x)] indexed by floor(2x) + 232, clamped to 0..434: the midpoints are multiples
    of 1/2 in [−115.5, 101], so m ≤ x ⟺ 2m ≤ floor(2x) and floor(2x) decides the grid value."""
    kv, mids = _grid(device)
    half = torch.arange(-232, 203, dtype=torch.float32, device=device) / 2
    return kv[torch.bucketize(half, mids, right=True)]


def _grid_values(x: Tensor, table: Tensor) -> Tensor:
    """kvalues[grid_index(x)] for finite x (one gather, ~10× faster than bucketize; overwrites x)."""
    return table[x.mul_(2).floor_().clamp_(-232, 202).add_(232).long()]


def _seqsum(t: Tensor) -> Tensor:
    """C's ``float s = 0; for j: s += t[j]`` over the FIRST dim, vectorised over the rest (numpy/torch
    reductions are pairwise, so their float32 sums differ in the last bits)."""
    s = torch.zeros(t.shape[1:], dtype=t.dtype, device=t.device)
    for part in t:
        s.add_(part)
    return s


def block_scales(xb: Tensor, wts: Tensor) -> Tensor:
    """The scale of each block of 32, ``quantize_row_iq4_nl_impl``'s first loop with ntry = 7.

    xb, wts: (N, 32) weights and the fit's weights → (N,) float32 d (0 for a block with max|x| < 1e-15).
    """
    ax = xb.abs()
    amax, imax = ax.amax(-1), ax.argmax(-1, keepdim=True)  # argmax: the first largest, as C's strict >
    zero = amax < torch.tensor(GROUP_MAX_EPS, dtype=torch.float32)  # scale 0, whatever the search says
    mx = xb.gather(-1, imax)[:, 0]  # (N,) signed max
    mx = torch.where(zero, torch.ones_like(mx), mx)  # keeps the search finite in those blocks: |x/max| ≤ 1
    xt, wt = xb.t().contiguous(), wts.t().contiguous()  # (32, N): C's loops over j run down the rows
    table = _value_table(xb.device)

    def fit(inv: Tensor) -> tuple[Tensor, Tensor]:  # Σ w·q·x, Σ w·q² for the codes of inv·x, C's order
        q = _grid_values(xt * inv, table)  # (32, N)
        wq = wt * q
        return _seqsum(wq * xt), _seqsum(wq.mul_(q))

    d = -mx / torch.full_like(mx, KVALUES_IQ4NL[0])  # -max/values[0]
    sumqx, sumq2 = fit(torch.ones_like(d) / d)
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = fit(torch.full_like(mx, itry + KVALUES_IQ4NL[0]) / mx)  # id = (itry + values[0])/max
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, torch.zeros_like(d), d)


def impl_scales(X: Tensor, imatrix: Tensor | None) -> Tensor:
    """Scales of the sub-blocks of 32 of super-blocks X: (R, n, S) (S = 32 or 256) → (R, n, S/32).

    The fit's weights: x² without an imatrix; with one (imatrix: (n, S)), imatrix·sqrt(σ² + x²), σ² = Σx²·2/S
    over the super-block (``quantize_row_iq4_nl_impl``)."""
    R, n, S = X.shape
    xb = X.reshape(R, n, S // BLOCK, BLOCK)
    if imatrix is None:
        wts = xb * xb
    else:
        sigma2 = _seqsum((X * X).movedim(-1, 0)) * (2 / S)  # (R, n); 2/S is a power of two
        wts = imatrix.reshape(1, n, S // BLOCK, BLOCK) * sqrtf(sigma2[..., None, None] + xb * xb)
    return block_scales(xb.reshape(-1, BLOCK), wts.reshape(-1, BLOCK)).reshape(R, n, S // BLOCK)


def _row_chunks(name: str, W: Tensor, imatrix: Tensor | None, choose) -> QParams:
    """``choose`` on slices of rows (parameters of a row depend on that row only), bounding temporaries."""
    if not bool(torch.isfinite(W).all()):
        raise LLMOptError(f"{name}: the weights hold inf or nan; llama.cpp's quantizer needs finite weights")
    rows, cols = W.shape
    step = max(1, CHUNK // cols)
    return QParams.cat_rows([choose(W[r : r + step], imatrix) for r in range(0, rows, step)])


def _imatrix_of(name: str, W: Tensor, mse_grid: int, weight: Tensor | None) -> Tensor | None:
    """The per-column importance ``qparams`` hands llama.cpp's rule, or None for its rule without one."""
    if mse_grid <= 0 or weight is None:
        return None
    cols = W.shape[1]
    if weight.dim() != 1 or weight.shape[0] != cols:
        raise LLMOptError(f"{name} takes a per-column importance of {cols} values (an imatrix)")
    return weight.detach().to(device=W.device, dtype=torch.float32)


class _NonLinearGrid:
    """Codes and values on d·kvalues_iq4nl, shared by iq4_nl and iq4_xs (a mixin before the format base)."""

    def _q(self, Wg: Tensor, qp: QParams) -> Tensor:
        if qp.ref_inv_scale is not None:  # llama.cpp: best_index_int8(16, kvalues, id·x), id unrounded
            return grid_index(Wg * qp.ref_inv_scale).to(torch.uint8)
        return grid_index(safe_div(Wg, qp.scale)).to(torch.uint8)

    def _dq(self, codes: Tensor, qp: QParams) -> Tensor:
        return qp.scale * _grid(codes.device)[0][codes.long()]  # ggml / gguf-py: d·kvalues[q] in float32

    def round_column(self, w: Tensor, qp: QParams) -> tuple[Tensor, Tensor]:
        """Nearest grid point of each weight of the column w: (rows,), qp grouped (rows, 1, 1): one division,
        one bucketize against the midpoints and one gather."""
        if qp.ref_inv_scale is not None:
            return super().round_column(w, qp)  # type: ignore[misc]
        s = qp.scale.view(-1)
        idx = grid_index(safe_div(w, s))
        return idx.to(torch.uint8), s * _grid(w.device)[0][idx]


class _IQ4_NL(_NonLinearGrid, _GGUFBlockFormat):
    """iq4_nl: blocks of 32, value d·kvalues_iq4nl[q], fp16 d (``quantize_iq4_nl``). The block bytes are the
    legacy 4-bit layout {d, qs[16]} without a min, which the legacy base packs and unpacks."""

    name = "iq4_nl"
    bits = 4
    symmetric = True  # no stored zero-point / min (the grid itself is not symmetric)
    gguf_type = GGMLQuantizationType.IQ4_NL
    takes_imatrix = True  # qparams wants the per-column importance; llama.cpp forms per-weight weights itself

    def qparams(self, W: Tensor, mse_grid: int = 0, weight: Tensor | None = None) -> QParams:
        """Per block of 32 of W: (rows, cols), llama.cpp's ``quantize_iq4_nl`` → QParams (rows, cols/32).

        ``mse_grid`` = 0 or ``weight`` None: without an importance matrix; otherwise ``weight`` (cols,) is the
        imatrix (llama.cpp's own ntry search is the search; ``mse_grid``'s value only switches it on, as in
        :meth:`SuperBlockFormat.qparams`)."""
        self.check_width(W.shape[1])
        W = W.detach().to(torch.float32)
        return _row_chunks(self.name, W, _imatrix_of(self.name, W, mse_grid, weight), self._choose)

    @staticmethod
    def _choose(W: Tensor, imatrix: Tensor | None) -> QParams:
        rows, cols = W.shape
        nb = cols // BLOCK
        imp = None if imatrix is None else imatrix.reshape(nb, BLOCK)
        d = impl_scales(W.reshape(rows, nb, BLOCK), imp)[..., 0]  # (rows, nb)
        # dh = fp16(scales[0]); the codes: best_index_int8(id·x), id = 1/scales[0] (0 if it is 0)
        return QParams(fp16(d), torch.zeros_like(d), ref_inv_scale=safe_inverse(d))

    def _range_params(self, Wg: Tensor, shrink: float | Tensor) -> QParams:
        raise LLMOptError(f"{self.name} chooses its parameters with llama.cpp's search (qparams), not by range")


class _IQ4_XS(_NonLinearGrid, SuperBlockFormat):
    """iq4_xs: super-blocks of 256, 8 sub-blocks of 32, value fp32(d)·(ls − 32)·kvalues_iq4nl[q]
    (``quantize_iq4_xs``); llama.cpp writes a row that is not a multiple of 256 as iq4_nl."""

    name = "iq4_xs"
    bits = 4
    group_size = BLOCK
    symmetric = True
    gguf_type = GGMLQuantizationType.IQ4_XS
    fallback = "iq4_nl"

    def _choose(self, W: Tensor, imatrix: Tensor | None) -> QParams:
        return _row_chunks(self.name, W, imatrix, self._choose_rows)

    @staticmethod
    def _choose_rows(W: Tensor, imatrix: Tensor | None) -> QParams:
        rows, cols = W.shape
        n = cols // QK_K
        imp = None if imatrix is None else imatrix.reshape(n, QK_K)
        scales = impl_scales(W.reshape(rows, n, QK_K), imp)  # (rows, n, 8)
        # max_scale: the first sub-block scale of largest magnitude (C's strict >, from +0)
        a = scales.abs()
        ms = scales.gather(-1, a.argmax(-1, keepdim=True))  # (rows, n, 1)
        ms = torch.where(a.amax(-1, keepdim=True) > 0, ms, torch.zeros_like(ms))
        d = -ms / 32  # exact (power of two); −0.0 for an all-zero super-block, as C
        l = torch.round(safe_inverse(d) * scales).clamp_(-32, 31).add_(0.0)  # nearest_int (half to even), an int: +0
        dl = d * l
        dh = fp16(d).expand(-1, -1, QK_K // BLOCK)
        per_group = (rows, n * (QK_K // BLOCK))
        return QParams(
            scale=(dh * l).reshape(per_group),  # gguf-py: d·(ls − 32) in float32
            zero=torch.zeros(per_group, device=W.device),
            ref_inv_scale=safe_inverse(dl).reshape(per_group),  # the codes: best_index_int8(x / (d·l))
            scale_code=(l + 32).reshape(per_group),
            super_scale=dh.reshape(per_group),
        )

    def levels(self, codes: Tensor, qp: QParams) -> None:
        return None  # the scale is d·(ls − 32), two stored codes: a free per-group refit cannot be stored

    def to_gguf_blocks(self, codes: Tensor, qp: QParams) -> np.ndarray:
        """``block_iq4_xs`` bytes, uint8 (rows, cols/256·136): d, scales_h, scales_l[4], qs[128]."""
        if qp.scale_code is None or qp.super_scale is None:
            raise LLMOptError("iq4_xs parameters need their sub-block scale codes and d; choose them with qparams")
        rows, cols = codes.shape
        n, sub = cols // QK_K, QK_K // BLOCK
        q = codes.cpu().numpy().astype(np.uint8).reshape(rows, n, sub, BLOCK)
        qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(rows, n, QK_K // 2)
        ls = qp.scale_code.cpu().numpy().astype(np.uint16).reshape(rows, n, sub)
        low = (ls & 0xF).astype(np.uint8)
        scales_l = low[..., 0::2] | (low[..., 1::2] << 4)  # (rows, n, 4)
        shifts = (2 * np.arange(sub)).astype(np.uint16)
        scales_h = np.bitwise_or.reduce((ls >> 4) << shifts, axis=-1).astype("<u2")  # (rows, n)
        d = qp.super_scale[:, ::sub].cpu().numpy().astype("<f2")  # (rows, n)
        parts = [d.view(np.uint8).reshape(rows, n, 2), scales_h.view(np.uint8).reshape(rows, n, 2), scales_l, qs]
        out = np.concatenate(parts, axis=-1)
        assert out.shape[-1] == GGML_QUANT_SIZES[self.gguf_type][1]
        return out.reshape(rows, -1)

    def from_gguf_blocks(self, data: np.ndarray) -> tuple[Tensor, QParams]:
        """Inverse of :meth:`to_gguf_blocks`: codes (rows, cols) and QParams with scale, scale_code, super_scale."""
        data = np.ascontiguousarray(data, dtype=np.uint8)
        rows = data.shape[0]
        blocks = data.reshape(rows, -1, GGML_QUANT_SIZES[self.gguf_type][1])  # (rows, n, 136)
        n, sub = blocks.shape[1], QK_K // BLOCK
        d = np.ascontiguousarray(blocks[..., 0:2]).view("<f2")[..., 0].astype(np.float32)  # (rows, n)
        scales_h = np.ascontiguousarray(blocks[..., 2:4]).view("<u2")[..., 0]  # (rows, n)
        low = np.stack([blocks[..., 4:8] & 0x0F, blocks[..., 4:8] >> 4], axis=-1).reshape(rows, n, sub)
        high = (scales_h[..., None] >> (2 * np.arange(sub))) & 3
        ls = torch.from_numpy((low | (high << 4)).astype(np.float32)).reshape(rows, -1)  # (rows, n·8)
        qs = blocks[..., 8:].reshape(rows, n, sub, 16)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (rows, n, 8, 32)
        dh = torch.from_numpy(d).repeat_interleave(sub, dim=1)  # (rows, n·8)
        qp = QParams(dh * (ls - 32), torch.zeros_like(dh), scale_code=ls, super_scale=dh)
        return torch.from_numpy(q.astype(np.uint8)).reshape(rows, -1), qp


# The registry's order: iq4_nl, iq4_xs.
IQ4_FORMATS: tuple[_GGUFBlockFormat | SuperBlockFormat, ...] = (_IQ4_NL(), _IQ4_XS())
