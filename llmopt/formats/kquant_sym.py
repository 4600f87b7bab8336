"""llama.cpp's symmetric K-quants q6_K and q3_K: super-blocks of 256 weights, 16 sub-blocks of 16.

Block layouts (``ggml-common.h``), little-endian:

* ``block_q6_K`` (210 bytes): ``ql[128]`` low 4 bits, ``qh[64]`` high 2 bits of the 6-bit codes,
  ``scales[16]`` int8 sub-block scales, fp16 ``d``. Value = d·sc·(q − 32), q ∈ 0..63.
* ``block_q3_K`` (110 bytes): ``hmask[32]`` bit 2 of each 3-bit code, ``qs[64]`` its low 2 bits,
  ``scales[12]`` sixteen 6-bit codes sc ∈ 0..63 (low nibbles in bytes 0..7, high 2-bit pairs in bytes
  8..11), fp16 ``d``. Value = d·(sc − 32)·(q − 4), q ∈ 0..7; the effective scale d·(sc − 32) may be negative.

Parameters are chosen by ``quantize_row_q6_K_ref`` / ``_impl`` and ``quantize_row_q3_K_ref`` / ``_impl``
(ported in :mod:`.kquant_sym_fits`); :class:`~llmopt.formats.params.QParams` carries the effective sub-block
scale fp32(d)·sc as ggml computes it (``scale``), the stored codes (``scale_code``: q6_K's int8 sc, q3_K's
0..63 sc) and d (``super_scale``). llama.cpp's codes are nearest_int(x / (d·sc)) clamped, i.e. the nearest
point of the stored grid, except in a sub-block whose d·sc is 0: there it keeps the codes of its first
search, which ``ref_inv_scale`` reproduces (see :meth:`_SymKQuant._q`). Which type llama.cpp writes instead
for rows that are not whole super-blocks (``tensor_type_fallback`` in ``llama-quant.cpp`` of the vendored
llama.cpp): q8_0 for q6_K, q4_0 for q3_K.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from llmopt.errors import LLMOptError
from llmopt.formats.base import QuantFormat
from llmopt.formats.kquant_sym_fits import (
    SUB,
    SuperBlockFit,
    make_q3_quants,
    nearest_int,
    q3_K_fit,
    q6_K_fit,
)
from llmopt.formats.numeric import safe_div
from llmopt.formats.params import QParams
from llmopt.formats.superblock import QK_K, SuperBlockFormat

Tensor = torch.Tensor

ROW_CHUNK = 1 << 19  # weights searched at once (make_qx_quants holds 19 trial codes per weight: ~40 MiB)


class _SymKQuant(SuperBlockFormat):
    """A symmetric K-quant: value = scale·(q − offset) per sub-block of 16, scale = fp32(d)·(sc − sc_offset)."""

    group_size = SUB
    symmetric = True
    offset: int  # the code of 0: 32 (q6_K), 4 (q3_K)
    sc_offset: int  # subtracted from the stored sub-block scale code: 0 (q6_K), 32 (q3_K)

    def _fit(self, x: Tensor, imatrix: Tensor | None) -> SuperBlockFit:
        raise NotImplementedError

    def _first_codes(self, x: Tensor, iscale: Tensor) -> Tensor:
        """The first search's codes of sub-blocks x: (K, 16) from their inverse scales (K, 1); NaN rows: 0."""
        o = self.offset
        q = nearest_int(iscale * x).clamp_(-o, o - 1) + o
        return torch.where(torch.isnan(iscale), 0, q)

    def _choose(self, W: Tensor, imatrix: Tensor | None) -> QParams:
        """llama.cpp's parameters of every super-block of W: (rows, cols), in row chunks."""
        rows, cols = W.shape
        step = max(1, ROW_CHUNK // cols)
        parts = []
        for r in range(0, rows, step):
            x = W[r : r + step].reshape(-1, cols // QK_K, QK_K)  # (R, nb, 256)
            fit = self._fit(x, imatrix)
            d = fit.d[..., None].expand_as(fit.sc)  # (R, nb, 16)
            scale = d * (fit.sc - self.sc_offset)  # ggml: GGML_FP16_TO_FP32(d) * sc, float32
            R = x.shape[0]
            parts.append(
                QParams(
                    scale.reshape(R, -1),
                    torch.zeros(R, cols // SUB),
                    ref_inv_scale=fit.iscale.reshape(R, -1),
                    scale_code=fit.sc.reshape(R, -1),
                    super_scale=d.reshape(R, -1).contiguous(),
                )
            )
        return QParams.cat_rows(parts)

    def _q(self, Wg: Tensor, qp: QParams) -> Tensor:
        """Codes q ∈ 0..2·offset−1 of grouped weights: the nearest grid point, round(w / scale) clamped (GPTQ's
        rounding; 0 → code ``offset`` where scale is 0). With ``ref_inv_scale`` (RTN on ``qparams``), llama.cpp's
        codes: nearest_int(w / scale) where scale ≠ 0, and where it is 0 the first search's codes, which need
        whole sub-blocks: q6_K and q3_K-imatrix nmax + nearest_int(ref_inv_scale·w), q3_K-ref make_q3_quants'
        codes, 0 where ref_inv_scale is NaN (an all-zero sub-block, a zeroed q6_K super-block)."""
        o = self.offset
        if qp.ref_inv_scale is None:
            return (torch.round(safe_div(Wg, qp.scale)).clamp_(-o, o - 1) + o).to(torch.uint8)
        if Wg.shape[-1] != SUB:
            raise ValueError(f"llama.cpp's codes of {self.name} need whole sub-blocks; quantize with qp.on_grid()")
        q = nearest_int(safe_div(Wg, qp.scale)).clamp_(-o, o - 1) + o
        zero = (qp.scale == 0).squeeze(-1).expand(Wg.shape[:-1])  # (..., rows, n_groups) sub-blocks kept as searched
        if bool(zero.any()):
            q[zero] = self._first_codes(Wg[zero], qp.ref_inv_scale.expand(*Wg.shape[:-1], 1)[zero])
        return q.to(torch.uint8)

    def _dq(self, codes: Tensor, qp: QParams) -> Tensor:
        return qp.scale * (codes.to(torch.float32) - self.offset)  # gguf-py: (d·sc) · (q − offset)

    def levels(self, codes: Tensor, qp: QParams) -> None:
        """None: a sub-block's scale is d·sc, an integer multiple of its super-block's d, so a free per-group
        refit of the scales (GPTQ's ``refit``) would leave the format; the refit leaves these formats unchanged."""
        return None

    def _pack_check(self, codes: Tensor, qp: QParams) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
        """(rows, nb, codes (rows, nb, 256) uint8, sc (rows, nb, 16) int16, fp16 d bytes (rows, nb, 2))."""
        if qp.scale_code is None or qp.super_scale is None:
            raise LLMOptError(f"{self.name} blocks need the sub-block scale codes and d; use {self.name}'s qparams")
        rows, cols = codes.shape
        nb = cols // QK_K
        q = codes.cpu().numpy().astype(np.uint8).reshape(rows, nb, QK_K)
        sc = qp.scale_code.cpu().numpy().astype(np.int16).reshape(rows, nb, SUB)
        d = qp.super_scale.cpu().numpy()[:, ::SUB].astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
        return rows, nb, q, sc, d

    def _unpacked(self, d: np.ndarray, sc: np.ndarray, q: np.ndarray) -> tuple[Tensor, QParams]:
        """(codes, QParams) from d (rows, nb) float32, sc (rows, nb, 16) codes, q (rows, nb, 256) codes."""
        rows, nb = d.shape
        dt = torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32))[..., None].expand(rows, nb, SUB)
        sct = torch.from_numpy(sc.astype(np.float32))
        scale = (dt * (sct - self.sc_offset)).reshape(rows, -1)
        qp = QParams(
            scale,
            torch.zeros_like(scale),
            scale_code=sct.reshape(rows, -1),
            super_scale=dt.reshape(rows, -1).contiguous(),
        )
        return torch.from_numpy(q.astype(np.uint8).reshape(rows, -1)), qp

    def _blocks(self, data: np.ndarray) -> np.ndarray:
        """uint8 (rows, n_bytes) → (rows, nb, type_size)."""
        data = np.ascontiguousarray(data, dtype=np.uint8)
        return data.reshape(data.shape[0], -1, GGML_QUANT_SIZES[self.gguf_type][1])


def _f16(raw: np.ndarray) -> np.ndarray:
    """(rows, nb, 2) bytes → (rows, nb) float32 of the fp16 they hold."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


class _Q6_K(_SymKQuant):
    """q6_K: value = d·sc·(q − 32), sc int8, q ∈ 0..63 (``quantize_row_q6_K_ref`` / ``_impl``)."""

    name, bits, gguf_type, fallback = "q6_K", 6, GGMLQuantizationType.Q6_K, "q8_0"
    offset, sc_offset = 32, 0

    def _fit(self, x: Tensor, imatrix: Tensor | None) -> SuperBlockFit:
        return q6_K_fit(x, imatrix)

    def to_gguf_blocks(self, codes: Tensor, qp: QParams) -> np.ndarray:
        """ql[l + 64h] = low(q[128h + l]) | low(q[128h + l + 64]) << 4 and ql[l + 32 + 64h] the same for
        q[·+32], q[·+96]; qh[l + 32h] = Σ_k high2(q[128h + l + 32k]) << 2k (l < 32, h = 0, 1)."""
        rows, nb, q, sc, d = self._pack_check(codes, qp)
        q = q.reshape(rows, nb, 2, 4, 32)  # (half, quarter, l)
        lo, hi = q & 0x0F, q >> 4
        ql = np.concatenate([lo[:, :, :, 0] | lo[:, :, :, 2] << 4, lo[:, :, :, 1] | lo[:, :, :, 3] << 4], axis=-1)
        qh = hi[:, :, :, 0] | hi[:, :, :, 1] << 2 | hi[:, :, :, 2] << 4 | hi[:, :, :, 3] << 6
        parts = [ql.reshape(rows, nb, 128), qh.reshape(rows, nb, 64), sc.astype(np.int8).view(np.uint8), d]
        return np.concatenate(parts, axis=-1).reshape(rows, -1)

    def from_gguf_blocks(self, data: np.ndarray) -> tuple[Tensor, QParams]:
        b = self._blocks(data)
        rows, nb = b.shape[:2]
        ql = b[..., :128].reshape(rows, nb, 2, 2, 32)  # (half, first / second 32, l)
        qh = b[..., 128:192].reshape(rows, nb, 2, 1, 32)
        lo = np.stack([ql[:, :, :, 0] & 0x0F, ql[:, :, :, 1] & 0x0F, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4], 3)
        hi = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)) & 3
        sc = b[..., 192:208].copy().view(np.int8)
        return self._unpacked(_f16(b[..., 208:210]), sc, lo | hi << 4)


class _Q3_K(_SymKQuant):
    """q3_K: value = d·(sc − 32)·(q − 4), sc ∈ 0..63, q ∈ 0..7 (``quantize_row_q3_K_ref`` / ``_impl``)."""

    name, bits, gguf_type, fallback = "q3_K", 3, GGMLQuantizationType.Q3_K, "q4_0"
    offset, sc_offset = 4, 32

    def _fit(self, x: Tensor, imatrix: Tensor | None) -> SuperBlockFit:
        return q3_K_fit(x, imatrix)

    def _first_codes(self, x: Tensor, iscale: Tensor) -> Tensor:
        """The imatrix rule's make_qx_quants codes from ``iscale``; NaN (the ref rule, or an all-zero
        sub-block): make_q3_quants' codes, recomputed (0 for an all-zero sub-block)."""
        q = super()._first_codes(x, iscale)
        nan = torch.isnan(iscale[:, 0])
        if bool(nan.any()):
            q[nan] = make_q3_quants(x[nan], 4)[1]
        return q

    def to_gguf_blocks(self, codes: Tensor, qp: QParams) -> np.ndarray:
        """hmask[m] = Σ_b bit2(q[32b + m]) << b; qs[l + 32h] = Σ_k low2(q[128h + l + 32k]) << 2k; scales: byte
        j < 8 holds low4(sc[j]) | low4(sc[j + 8]) << 4, byte 8 + k holds Σ_g high2(sc[4g + k]) << 2g."""
        rows, nb, q, sc, d = self._pack_check(codes, qp)
        shifts = np.arange(8, dtype=np.uint8)
        hmask = (((q >> 2) & 1).reshape(rows, nb, 8, 32) << shifts.reshape(8, 1)).sum(2, dtype=np.uint8)
        low = (q & 3).reshape(rows, nb, 2, 4, 32) << (2 * shifts[:4]).reshape(4, 1)
        qs = low.sum(3, dtype=np.uint8).reshape(rows, nb, 64)
        sc = sc.astype(np.uint8)
        nib = (sc[..., :8] & 0x0F) | (sc[..., 8:] & 0x0F) << 4
        high = ((sc >> 4).reshape(rows, nb, 4, 4) << (2 * shifts[:4]).reshape(4, 1)).sum(2, dtype=np.uint8)
        return np.concatenate([hmask, qs, nib, high, d], axis=-1).reshape(rows, -1)

    def from_gguf_blocks(self, data: np.ndarray) -> tuple[Tensor, QParams]:
        b = self._blocks(data)
        rows, nb = b.shape[:2]
        shifts = np.arange(8, dtype=np.uint8)
        h = (b[..., None, :32] >> shifts.reshape(8, 1)) & 1  # (rows, nb, 8, 32)
        low = (b[..., 32:96].reshape(rows, nb, 2, 1, 32) >> (2 * shifts[:4]).reshape(4, 1)) & 3
        q = low.reshape(rows, nb, QK_K) | h.reshape(rows, nb, QK_K) << 2
        s = b[..., 96:108]
        nib = np.concatenate([s[..., :8] & 0x0F, s[..., :8] >> 4], axis=-1)  # (rows, nb, 16)
        high = ((s[..., None, 8:12] >> (2 * shifts[:4]).reshape(4, 1)) & 3).reshape(rows, nb, 16)
        return self._unpacked(_f16(b[..., 108:110]), nib | high << 4, q)


# The registry's order: q6_K, q3_K (make_format resolves them case-insensitively).
KQUANT_SYM_FORMATS: tuple[QuantFormat, ...] = (_Q6_K(), _Q3_K())
