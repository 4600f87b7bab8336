"""llama.cpp's K-quants with mins: q4_K, q5_K and q2_K, and their GGUF bytes.

Value of a weight: d·sc·q − dmin·m, with fp16 ``d`` / ``dmin`` per super-block of 256 weights and integer
scale and min codes ``sc`` / ``m`` per sub-block (the format's group); in QParams terms scale = d·sc and
zero = −(dmin·m) in float32, as ggml and gguf-py compute them. Block layouts (``ggml-common.h``):

* ``block_q4_K`` (144 bytes): d, dmin (fp16), scales[12] (8 six-bit scale and 8 six-bit min codes, packed as
  ``get_scale_min_k4`` reads them), qs[128]: sub-blocks of 32, q ∈ 0..15; byte 32c + l of qs holds weight
  64c + l in its low nibble and 64c + 32 + l in its high one.
* ``block_q5_K`` (176 bytes): d, dmin, scales[12], qh[32], qs[128]: q ∈ 0..31, the low 4 bits in qs as q4_K,
  bit k of qh[l] is bit 4 of weight 32k + l.
* ``block_q2_K`` (84 bytes): scales[16] (scale code in the low nibble, min code in the high one), qs[64],
  d, dmin: sub-blocks of 16, q ∈ 0..3; bits 2k of qs[32h + l] hold weight 128h + 32k + l.

Parameters are llama.cpp's (:mod:`.kquant_fits`: ``quantize_row_q{2,4,5}_K_ref`` without an importance,
``quantize_row_q{2,4,5}_K_impl`` with one). llama.cpp rounds each weight to the nearest point of its
sub-block's stored grid, except in a sub-block whose d·sc is 0: there it keeps the codes of its search
(``make_qkx*_quants``), which ``qparams`` carries as ``ref_inv_scale`` (that search's inverse step) and
``ref_min`` (its origin), q = clamp(nearest(ref_inv_scale·(w − ref_min))); :meth:`QParams.on_grid` drops them.
Rows must be whole super-blocks; llama.cpp's quantizer writes other tensors in the ``fallback`` type
(``tensor_type_fallback`` in ``llama-quant.cpp``: Q4_K → Q5_0, Q5_K → Q5_1, Q2_K → Q4_0).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from llmopt.errors import LLMOptError
from llmopt.formats.kquant_fits import (
    KChoice,
    get_scale_min_k4,
    pack_scales_k4,
    quantize_row_q2_K_impl,
    quantize_row_q2_K_ref,
    quantize_row_q45_K_impl,
    quantize_row_q45_K_ref,
)
from llmopt.formats.numeric import safe_div
from llmopt.formats.params import QParams
from llmopt.formats.superblock import QK_K, SuperBlockFormat

Tensor = torch.Tensor


def _nearest_int(v: Tensor) -> Tensor:
    """ggml's ``nearest_int`` of float32 v (round half to even; its exact bits also outside |v| < 2²²)."""
    return ((v + 12582912.0).view(torch.int32) & 0x007FFFFF) - 0x00400000


class _KMinFormat(SuperBlockFormat):
    """A K-quant with mins: value = scale·q + zero per sub-block, scale = d·sc, zero = −(dmin·m)."""

    symmetric = False

    @property
    def nmax(self) -> int:
        return 2**self.bits - 1

    # --- llama.cpp's choice -------------------------------------------------------------------------------
    def _rule(self, x: np.ndarray, imatrix: np.ndarray | None) -> KChoice:
        """llama.cpp's parameters of super-blocks x: (S, 256) float32 (the ``_ref`` rule when imatrix is None)."""
        raise NotImplementedError

    def _choose(self, W: Tensor, imatrix: Tensor | None) -> QParams:
        rows, cols = W.shape
        x = W.cpu().numpy().reshape(-1, QK_K)
        ch = self._rule(x, None if imatrix is None else imatrix.cpu().numpy())
        n = QK_K // self.group_size

        def t(a: np.ndarray) -> Tensor:  # (S, n) or (S,) → (rows, cols / group) float32 on W's device
            a = np.broadcast_to(a.reshape(a.shape[0], -1), (a.shape[0], n))
            return torch.from_numpy(np.array(a, dtype=np.float32)).reshape(rows, -1).to(W.device)

        d, dmin, sc, m = t(ch.d), t(ch.dmin), t(ch.sc), t(ch.m)
        return QParams(
            d * sc, -(dmin * m), ref_inv_scale=t(ch.iscale), ref_min=t(ch.origin),
            scale_code=sc, zero_code=m, super_scale=d, super_zero=dmin,
        )  # fmt: skip

    # --- codes and values ---------------------------------------------------------------------------------
    def _q(self, Wg: Tensor, qp: QParams) -> Tensor:
        x = safe_div(Wg - qp.zero, qp.scale)  # ggml: nearest_int((x + dm)/d), x − (−dm) = x + dm exactly
        if qp.ref_inv_scale is None or qp.ref_min is None:  # on the stored grid
            return torch.round(x).clamp_(0, self.nmax).to(torch.uint8)
        found = qp.ref_inv_scale * (Wg - qp.ref_min)  # d·sc = 0: the search's codes
        q = _nearest_int(torch.where(qp.scale == 0, found, x))
        return q.clamp_(0, self.nmax).to(torch.uint8)

    def _dq(self, codes: Tensor, qp: QParams) -> Tensor:
        return qp.scale * codes.to(torch.float32) + qp.zero  # gguf-py: (d·sc)·q − dmin·m

    def levels(self, codes: Tensor, qp: QParams) -> None:
        return None  # the min is a second parameter per sub-block

    # --- GGUF bytes ---------------------------------------------------------------------------------------
    def _pack(self, q: np.ndarray, sc: np.ndarray, m: np.ndarray, dd: np.ndarray) -> list[np.ndarray]:
        """Byte fields of super-blocks: q (R, S, 256), sc / m (R, S, n) uint8, dd (R, S, 4) the fp16 d, dmin."""
        raise NotImplementedError

    def _unpack(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Inverse of :meth:`_pack`: (R, S, type_size) → q (R, S, 256), sc, m (R, S, n), dd (R, S, 4)."""
        raise NotImplementedError

    def to_gguf_blocks(self, codes: Tensor, qp: QParams) -> np.ndarray:
        """The ``block_q*_K`` bytes of codes (rows, cols) with their parameters: uint8 (rows, bytes per row)."""
        if qp.scale_code is None or qp.zero_code is None or qp.super_scale is None or qp.super_zero is None:
            raise LLMOptError(f"{self.name} blocks need the sub-block codes and super-block d / dmin of qparams")
        rows, cols = codes.shape
        S, n = cols // QK_K, QK_K // self.group_size

        def sub(t: Tensor) -> np.ndarray:  # (rows, S·n) → (rows, S, n)
            return t.cpu().numpy().reshape(rows, S, n)

        f16 = np.stack([sub(qp.super_scale)[..., 0], sub(qp.super_zero)[..., 0]], -1).astype(np.float16)
        dd = f16.view(np.uint8).reshape(rows, S, 4)
        q = codes.cpu().numpy().astype(np.uint8).reshape(rows, S, QK_K)
        sc, m = sub(qp.scale_code).astype(np.uint8), sub(qp.zero_code).astype(np.uint8)
        out = np.concatenate(self._pack(q, sc, m, dd), axis=-1)
        assert out.shape[-1] == GGML_QUANT_SIZES[self.gguf_type][1]
        return out.reshape(rows, -1)

    def from_gguf_blocks(self, data: np.ndarray) -> tuple[Tensor, QParams]:
        data = np.ascontiguousarray(data, dtype=np.uint8)
        rows = data.shape[0]
        q, sc, m, dd = self._unpack(data.reshape(rows, -1, GGML_QUANT_SIZES[self.gguf_type][1]))
        S, n = q.shape[1], sc.shape[-1]
        dd = np.ascontiguousarray(dd).view(np.float16).astype(np.float32)  # (rows, S, 2)

        def t(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.array(np.broadcast_to(a, (rows, S, n)), dtype=np.float32))

        d, dmin = t(dd[..., :1]).reshape(rows, -1), t(dd[..., 1:]).reshape(rows, -1)
        scf, mf = t(sc).reshape(rows, -1), t(m).reshape(rows, -1)
        qp = QParams(d * scf, -(dmin * mf), scale_code=scf, zero_code=mf, super_scale=d, super_zero=dmin)
        return torch.from_numpy(q.reshape(rows, -1).astype(np.uint8)), qp


def _nibbles(q: np.ndarray) -> np.ndarray:
    """qs of q4_K / q5_K: (R, S, 256) codes → (R, S, 128), low nibble weight 64c + l, high 64c + 32 + l."""
    q = q.reshape(*q.shape[:2], 4, 2, 32)
    return ((q[..., 0, :] & 0xF) | ((q[..., 1, :] & 0xF) << 4)).reshape(*q.shape[:2], 128)


def _from_nibbles(qs: np.ndarray) -> np.ndarray:
    qs = qs.reshape(*qs.shape[:2], 4, 1, 32)
    return np.concatenate([qs & 0xF, qs >> 4], axis=-2).reshape(*qs.shape[:2], QK_K)


class _Q45_K(_KMinFormat):
    """q4_K / q5_K: sub-blocks of 32 with 6-bit scale and min codes (``quantize_row_q{4,5}_K_ref|impl``)."""

    group_size = 32

    def _rule(self, x: np.ndarray, imatrix: np.ndarray | None) -> KChoice:
        if imatrix is None:
            return quantize_row_q45_K_ref(x, self.nmax)
        return quantize_row_q45_K_impl(x, self.nmax, imatrix)

    def _pack(self, q, sc, m, dd):
        fields = [dd, pack_scales_k4(sc, m)]
        if self.bits == 5:
            fields.append(np.packbits((q.reshape(*q.shape[:2], 8, 32) >> 4) & 1, axis=-2, bitorder="little")[..., 0, :])
        return [*fields, _nibbles(q)]

    def _unpack(self, blocks):
        dd, scales = blocks[..., :4], blocks[..., 4:16]
        sc, m = get_scale_min_k4(scales)
        q = _from_nibbles(blocks[..., -128:])
        if self.bits == 5:
            qh = np.unpackbits(blocks[..., 16:48, None], axis=-1, bitorder="little")  # (R, S, 32 bytes, 8 bits)
            q = q | (np.swapaxes(qh, -1, -2).reshape(q.shape) << 4)
        return q, sc, m, dd


class _Q4_K(_Q45_K):
    name, bits, gguf_type, fallback = "q4_K", 4, GGMLQuantizationType.Q4_K, "q5_0"


class _Q5_K(_Q45_K):
    name, bits, gguf_type, fallback = "q5_K", 5, GGMLQuantizationType.Q5_K, "q5_1"


class _Q2_K(_KMinFormat):
    """q2_K: sub-blocks of 16 with 4-bit scale and min codes in one byte (``quantize_row_q2_K_ref|impl``)."""

    name, bits, gguf_type, fallback = "q2_K", 2, GGMLQuantizationType.Q2_K, "q4_0"
    group_size = 16

    def _rule(self, x: np.ndarray, imatrix: np.ndarray | None) -> KChoice:
        return quantize_row_q2_K_ref(x) if imatrix is None else quantize_row_q2_K_impl(x, imatrix)

    def _pack(self, q, sc, m, dd):
        q = q.reshape(*q.shape[:2], 2, 4, 32)
        qs = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
        return [(sc & 0xF) | (m << 4), qs.reshape(*q.shape[:2], 64), dd]

    def _unpack(self, blocks):
        scales, qs, dd = blocks[..., :16], blocks[..., 16:80], blocks[..., 80:84]
        qs = qs.reshape(*qs.shape[:2], 2, 1, 32)
        q = (qs >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3  # (R, S, 2, 4, 32)
        return q.reshape(*qs.shape[:2], QK_K), scales & 0xF, scales >> 4, dd


# The registry's order: q4_K, q5_K, q2_K.
KQUANT_MIN_FORMATS: tuple[SuperBlockFormat, ...] = (_Q4_K(), _Q5_K(), _Q2_K())
