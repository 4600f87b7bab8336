"""llama.cpp's legacy block formats q8_0, q4_0, q4_1, q5_0, q5_1 and their GGUF bytes.

Blocks of 32 along the row (``ggml-quants.c``, ``quantize_row_*_ref``), fp16 scale d:
``q8_0`` value d·q, q ∈ −127..127 (int8 codes), d = max|w| / 127;
``q4_0``/``q5_0`` value d·(q − 2ᵇ⁻¹), q ∈ 0..2ᵇ−1, d = max / −2ᵇ⁻¹ with max the signed value of
largest magnitude; ``q4_1``/``q5_1`` value d·q + m, q ∈ 0..2ᵇ−1, d = (max − min) / (2ᵇ−1), m = min
(fp16). What this module simulates is bit for bit what a GGUF file holds and what llama.cpp /
gguf-py dequantize. Its formats are named in :mod:`.registry` through ``LEGACY_FORMATS``.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from llmopt.formats.base import QuantFormat
from llmopt.formats.numeric import fp16, round_half_away, safe_div, safe_inverse
from llmopt.formats.params import QParams
from llmopt.formats.refit import REFIT_STEPS, lsq_affine, lsq_step

Tensor = torch.Tensor

GGUF_BLOCK = 32  # QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 in ggml-common.h


class _GGUFBlockFormat(QuantFormat):
    """llama.cpp legacy block formats: blocks of 32 weights along the row, fp16 scale (and min)."""

    group_size = GGUF_BLOCK
    has_min = False

    def bits_per_weight(self, in_features: int | None = None) -> float:
        """GGUF bytes per block · 8 / 32: codes + fp16 d (+ fp16 m for q4_1/q5_1)."""
        block, type_size = GGML_QUANT_SIZES[self.gguf_type]
        return type_size * 8 / block

    def __repr__(self) -> str:
        return f"make_format({self.name!r})"

    def to_gguf_blocks(self, codes: Tensor, qp: QParams) -> np.ndarray:
        """llama.cpp block layout (``block_q4_0`` etc. in ggml-common.h), little-endian.

        q8_0: d, qs[32] int8.  q4_0: d, qs[16].  q4_1: d, m, qs[16].  q5_0: d, qh[4], qs[16].
        q5_1: d, m, qh[4], qs[16]. qs[i] = (q[i] & 15) | (q[i+16] & 15) << 4; bit i of the uint32 qh
        is bit 4 of q[i].
        """
        rows, cols = codes.shape
        nb = cols // GGUF_BLOCK
        q = codes.cpu().numpy().reshape(rows, nb, GGUF_BLOCK)

        def f16_bytes(t: Tensor) -> np.ndarray:  # (rows, nb) → (rows, nb, 2)
            return t.cpu().numpy().astype(np.float16).view(np.uint8).reshape(rows, nb, 2)

        parts = [f16_bytes(qp.scale)]
        if self.has_min:
            parts.append(f16_bytes(qp.zero))
        if self.bits == 8:
            parts.append(q.astype(np.int8).view(np.uint8))
        else:
            q = q.astype(np.uint8)
            if self.bits == 5:
                parts.append(np.packbits((q >> 4) & 1, axis=-1, bitorder="little"))  # qh: (rows, nb, 4)
            half = GGUF_BLOCK // 2
            parts.append((q[..., :half] & 0x0F) | ((q[..., half:] & 0x0F) << 4))  # qs: (rows, nb, 16)
        out = np.concatenate(parts, axis=-1)
        assert out.shape[-1] == GGML_QUANT_SIZES[self.gguf_type][1]
        return out.reshape(rows, -1)

    def from_gguf_blocks(self, data: np.ndarray) -> tuple[Tensor, QParams]:
        type_size = GGML_QUANT_SIZES[self.gguf_type][1]
        data = np.ascontiguousarray(data, dtype=np.uint8)
        rows = data.shape[0]
        blocks = data.reshape(rows, -1, type_size)  # (rows, nb, type_size)

        def take_f16(at: int) -> Tensor:  # (rows, nb) float32
            raw = np.ascontiguousarray(blocks[..., at : at + 2]).view(np.float16)[..., 0]
            return torch.from_numpy(raw.astype(np.float32))

        scale = take_f16(0)
        zero = take_f16(2) if self.has_min else torch.zeros_like(scale)
        at = 4 if self.has_min else 2
        if self.bits == 8:
            q = torch.from_numpy(blocks[..., at:].copy().view(np.int8))
        else:
            qh = None
            if self.bits == 5:
                qh = np.unpackbits(blocks[..., at : at + 4], axis=-1, bitorder="little")  # (rows, nb, 32)
                at += 4
            qs = blocks[..., at:]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (rows, nb, 32)
            if qh is not None:
                q = q | (qh << 4)
            q = torch.from_numpy(q.astype(np.uint8))
        return q.reshape(rows, -1), QParams(scale, zero)


class _Q8_0(_GGUFBlockFormat):
    """q8_0: value d·q, q ∈ −127..127, d = fp16(max|w| / 127) (``quantize_row_q8_0_ref``)."""

    name = "q8_0"
    bits = 8
    symmetric = True
    gguf_type = GGMLQuantizationType.Q8_0
    code_dtype = torch.int8

    def _range_params(self, Wg: Tensor, shrink: float) -> QParams:
        amax = Wg.abs().amax(-1) * shrink  # (rows, nb)
        d = amax / torch.full_like(amax, 127.0)  # float32 division, as ggml
        return QParams(fp16(d), torch.zeros_like(d), ref_inv_scale=safe_inverse(d))

    def _q(self, Wg: Tensor, qp: QParams) -> Tensor:
        if qp.ref_inv_scale is not None:  # ggml: roundf(x · id), id from the unrounded d
            q = round_half_away(Wg * qp.ref_inv_scale)
        else:
            q = torch.round(safe_div(Wg, qp.scale))
        return q.clamp(-127, 127).to(torch.int8)

    def _dq(self, codes: Tensor, qp: QParams) -> Tensor:
        return codes.to(torch.float32) * qp.scale  # gguf-py: x · d

    def _fake(self, Wg: Tensor, qp: QParams) -> Tensor:
        return self._fake_symmetric(Wg, qp.scale, -127.0, 127.0)

    def _refit_candidates(self, Wg: Tensor, imp: Tensor) -> QParams:
        """Inverse scales (127 + k/10)/max|w|, codes l ∈ [−127, 127], step refitted: Σ imp·w·l / Σ imp·l²."""
        amax = Wg.abs().amax(-1, keepdim=True)
        k = torch.tensor(REFIT_STEPS, dtype=torch.float32, device=Wg.device).view(-1, 1, 1, 1)
        l = (safe_div(127 + k / 10, amax) * Wg).clamp_(-127, 127).round_()
        d = fp16(lsq_step(Wg, l, imp))
        return QParams(d, torch.zeros_like(d))


class _SignedMaxBlock(_GGUFBlockFormat):
    """q4_0 / q5_0: value d·(q − 2ᵇ⁻¹), q ∈ 0..2ᵇ−1, d = fp16(max / −2ᵇ⁻¹), max = signed value of
    largest magnitude (first one on ties), so max itself lands exactly on code 0."""

    symmetric = True

    @property
    def offset(self) -> int:
        return 2 ** (self.bits - 1)

    def _range_params(self, Wg: Tensor, shrink: float) -> QParams:
        imax = Wg.abs().argmax(-1, keepdim=True)  # first index of the largest |w|, as numpy argmax
        mx = Wg.gather(-1, imax).squeeze(-1) * shrink  # (rows, nb) signed
        d = mx / -self.offset  # exact: power of two
        return QParams(fp16(d), torch.zeros_like(d), ref_inv_scale=safe_inverse(d))

    def _refit_candidates(self, Wg: Tensor, imp: Tensor) -> QParams:
        """Weighted least-squares scales, as llama.cpp's ``make_qx_quants`` (rmse_type 1) behind its
        importance-matrix quantization: for inverse scales −(o + k/10)/max, k in REFIT_STEPS, round to codes
        l ∈ [−o, o−1], then refit d = Σ_j imp_j·w_j·l_j / Σ_j imp_j·l_j², the best step for those codes.
        Unlike shrinking the range, this can also widen it. Wg: (rows, nb, g); imp: (1, nb, g)."""
        o = self.offset
        mx = Wg.gather(-1, Wg.abs().argmax(-1, keepdim=True))  # (rows, nb, 1) signed max
        k = torch.tensor(REFIT_STEPS, dtype=torch.float32, device=Wg.device).view(-1, 1, 1, 1)
        l = (safe_div(-(o + k / 10), mx) * Wg).clamp_(-o, o - 1).round_()  # (K, rows, nb, g)
        d = fp16(lsq_step(Wg, l, imp))  # (K, rows, nb)
        return QParams(d, torch.zeros_like(d))

    def _q(self, Wg: Tensor, qp: QParams) -> Tensor:
        o = self.offset
        if qp.ref_inv_scale is not None:  # ggml: MIN(2ᵇ−1, (int8_t)(x·id + o + 0.5f))
            q = torch.trunc(Wg * qp.ref_inv_scale + (o + 0.5))
        else:
            q = torch.round(safe_div(Wg, qp.scale)) + o
        return q.clamp(0, 2**self.bits - 1).to(torch.uint8)

    def _dq(self, codes: Tensor, qp: QParams) -> Tensor:
        # gguf-py: d · (q − o) with (q − o) int8 → float32
        return qp.scale * (codes.to(torch.float32) - self.offset)

    def _fake(self, Wg: Tensor, qp: QParams) -> Tensor:
        return self._fake_symmetric(Wg, qp.scale, -float(self.offset), float(self.offset - 1))


class _MinBlock(_GGUFBlockFormat):
    """q4_1 / q5_1: value d·q + m, q ∈ 0..2ᵇ−1, d = fp16((max − min)/(2ᵇ−1)), m = fp16(min)."""

    symmetric = False
    has_min = True

    def _range_params(self, Wg: Tensor, shrink: float) -> QParams:
        mn = Wg.amin(-1) * shrink  # (rows, nb)
        mx = Wg.amax(-1) * shrink
        d = (mx - mn) / torch.full_like(mn, float(2**self.bits - 1))
        return QParams(fp16(d), fp16(mn), ref_inv_scale=safe_inverse(d), ref_min=mn)

    def _q(self, Wg: Tensor, qp: QParams) -> Tensor:
        if qp.ref_inv_scale is not None and qp.ref_min is not None:  # ggml: (x − min)·id + 0.5f
            q = torch.trunc((Wg - qp.ref_min) * qp.ref_inv_scale + 0.5)
        else:
            q = torch.round(safe_div(Wg - qp.zero, qp.scale))
        return q.clamp(0, 2**self.bits - 1).to(torch.uint8)

    def levels(self, codes: Tensor, qp: QParams) -> None:
        return None  # d·q + m: the min is a second parameter per block

    def _dq(self, codes: Tensor, qp: QParams) -> Tensor:
        return qp.scale * codes.to(torch.float32) + qp.zero  # d·q + m

    def _fake(self, Wg: Tensor, qp: QParams) -> Tensor:
        return self._fake_symmetric(Wg, qp.scale, 0.0, float(2**self.bits - 1), m=qp.zero)

    def _refit_candidates(self, Wg: Tensor, imp: Tensor) -> QParams:
        """Codes from the range shrunk by 1 − k/20 (k ≥ 0 of REFIT_STEPS), then d and m refitted
        together by weighted least squares (llama.cpp ``make_qkx`` style), both rounded to fp16."""
        f = 1 - torch.tensor([k for k in REFIT_STEPS if k >= 0], dtype=torch.float32, device=Wg.device) / 20
        start = self._range_params(Wg, f.view(-1, 1, 1)).on_grid()  # (K, rows, nb)
        l = self._q(Wg, start.grouped()).to(torch.float32)
        d, m = lsq_affine(Wg, l, imp)
        bad = d <= 0
        return QParams(torch.where(bad, start.scale, fp16(d)), torch.where(bad, start.zero, fp16(m)))


class _Q4_0(_SignedMaxBlock):
    name, bits, gguf_type = "q4_0", 4, GGMLQuantizationType.Q4_0


class _Q5_0(_SignedMaxBlock):
    name, bits, gguf_type = "q5_0", 5, GGMLQuantizationType.Q5_0


class _Q4_1(_MinBlock):
    name, bits, gguf_type = "q4_1", 4, GGMLQuantizationType.Q4_1


class _Q5_1(_MinBlock):
    name, bits, gguf_type = "q5_1", 5, GGMLQuantizationType.Q5_1


# The registry's order: q8_0, q4_0, q4_1, q5_0, q5_1 (make_format lists the names in it).
LEGACY_FORMATS: tuple[QuantFormat, ...] = (_Q8_0(), _Q4_0(), _Q4_1(), _Q5_0(), _Q5_1())
