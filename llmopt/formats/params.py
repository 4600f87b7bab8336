"""Per-group parameters of a format (:class:`QParams`) and the output of a quantization kernel
(:class:`QuantResult`).

Groups. W: (rows, cols) = (out, in) is cut along the input dim into ``n_groups = cols / group_size``
contiguous groups (one group per row when ``group_size`` is None). :class:`QParams` tensors are
(rows, n_groups); search candidates stack a leading dim, (C, rows, n_groups).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class QParams:
    """Per-group parameters of a format, each (rows, n_groups) float32.

    scale: the step of the grid. GGUF block formats: the fp16 d the file stores (rounded before it is
        put here); int formats: the fp16-rounded scale.
    zero:  int formats: the integer zero-point (value = scale·(q − zero)); q4_1/q5_1: the fp16 min m
        (value = d·q + m); q8_0/q4_0/q5_0: zeros, unused (their offset 0 / 2ᵇ⁻¹ is a format constant).
    ref_inv_scale, ref_min: only set by ``qparams`` of GGUF block formats. llama.cpp's reference
        quantizer picks codes with the unrounded float32 1/d (and, for q4_1/q5_1, the unrounded min)
        while it stores fp16 d and m; when present, ``quantize`` does the same, so RTN bytes equal
        ``gguf.quants.quantize``. :meth:`on_grid` drops them: codes are then the nearest points of
        the stored grid (what GPTQ and the clipping search use).
    scale_code, zero_code, super_scale, super_zero: only for two-level formats (llama.cpp's K-quants and
        IQ4_XS, :mod:`.superblock`), where a super-block of 256 weights stores fp16 ``d`` (and ``dmin``) and
        each sub-block (the group) a small integer scale code (and min code). Per group: the integer codes
        (float32 holding integers) and the super-block's fp16 d / dmin repeated for each of its groups;
        ``scale`` and ``zero`` are then the effective values ggml computes from them (e.g. q4_K:
        scale = d·sc, zero = −dmin·m, value = scale·q + zero), so every algorithm sees one grid per group.
    """

    scale: Tensor
    zero: Tensor
    ref_inv_scale: Tensor | None = None
    ref_min: Tensor | None = None
    scale_code: Tensor | None = None
    zero_code: Tensor | None = None
    super_scale: Tensor | None = None
    super_zero: Tensor | None = None

    @property
    def n_groups(self) -> int:
        return self.scale.shape[-1]

    def select(self, k: int | slice) -> QParams:
        """Parameters of group k (an int gives (rows, 1)) or of a slice of groups."""
        k = slice(k, k + 1) if isinstance(k, int) else k
        return QParams(*(None if t is None else t[..., k] for t in self.tensors()))

    def grouped(self) -> QParams:
        """The same parameters with a trailing unit dim, (..., rows, n_groups, 1): they broadcast over
        the weights of a group laid out as (..., rows, n_groups, group_size)."""
        return QParams(*(None if t is None else t.unsqueeze(-1) for t in self.tensors()))

    def take(self, index: Tensor) -> QParams:
        """Per group, the candidate ``index`` (rows, n_groups) of stacked candidates (C, rows, n_groups)."""
        i = index.unsqueeze(0)
        return QParams(self.scale.gather(0, i)[0], self.zero.gather(0, i)[0])

    def on_grid(self) -> QParams:
        """The same grid without llama.cpp's reference rounding: quantize picks the nearest grid point."""
        return replace(self, ref_inv_scale=None, ref_min=None)

    def stored(self) -> dict[str, Tensor]:
        """The fields an output folder keeps (``quantization.safetensors``): scale and zero always, the
        two-level fields where the format has them; ``ref_*`` never (they only steer RTN's rounding)."""
        names = ("scale", "zero", *STORED_EXTRA)
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @staticmethod
    def cat(parts: list[QParams]) -> QParams:
        """Concatenate parameters of consecutive groups along the group dim."""
        fields = list(zip(*(p.tensors() for p in parts)))
        return QParams(*(None if any(t is None for t in f) else torch.cat(f, dim=-1) for f in fields))

    @staticmethod
    def cat_rows(parts: list[QParams]) -> QParams:
        """Concatenate parameters of consecutive row slices along the row dim."""
        fields = list(zip(*(p.tensors() for p in parts)))
        return QParams(*(None if any(t is None for t in f) else torch.cat(f, dim=-2) for f in fields))

    @staticmethod
    def cat_candidates(parts: list[QParams]) -> QParams:
        """Stack search candidates (C_i, rows, n_groups) along the candidate dim (scale and zero only)."""
        return QParams(torch.cat([p.scale for p in parts]), torch.cat([p.zero for p in parts]))

    def tensors(self) -> tuple[Tensor | None, ...]:
        """All fields in their order (scale, zero, ref_inv_scale, ref_min, scale_code, zero_code,
        super_scale, super_zero); None where a format has none."""
        return (
            self.scale,
            self.zero,
            self.ref_inv_scale,
            self.ref_min,
            self.scale_code,
            self.zero_code,
            self.super_scale,
            self.super_zero,
        )


STORED_EXTRA = ("scale_code", "zero_code", "super_scale", "super_zero")  # saved besides scale / zero


@dataclass
class QuantResult:
    """Output of a quantization kernel (RTN or GPTQ).

    codes:   (rows, cols) integer codes as the format stores them (uint8; int8 for q8_0), in the
             original column order.
    qparams: (rows, n_groups) scales / zeros, groups in the original column order.
    weight:  (rows, cols) float32 dequantized ("fake-quant") weights = fmt.dequantize(codes, qparams).
    loss:    tr((W − Ŵ) H (W − Ŵ)ᵀ); nan when no Hessian was given.
    pruned_nonzero: weights marked pruned (keep_mask False) whose quantized value is not exactly 0.
             0 for every format whose grid contains 0 (int, q8_0, q4_0, q5_0); can be > 0 for
             q4_1/q5_1, whose grid d·q + m generally misses 0.
    damp:    damping fraction GPTQ actually used (None for RTN).
    """

    codes: Tensor
    qparams: QParams
    weight: Tensor
    loss: float
    pruned_nonzero: int = 0
    damp: float | None = None
