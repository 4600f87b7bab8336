"""Quantization number formats: grid, rounding, storage, and GGUF block layout.

A format only answers questions; it never runs an algorithm. RTN (:func:`rtn_quantize`) and GPTQ
(:mod:`llmopt.kernels.gptq`) ask it for per-group parameters (:meth:`QuantFormat.qparams`), for the
code of each weight (:meth:`QuantFormat.quantize`) and for the float value of a code
(:meth:`QuantFormat.dequantize`).

Groups. W: (rows, cols) = (out, in) is cut along the input dim into ``n_groups = cols / group_size``
contiguous groups (one group per row when ``group_size`` is None). :class:`QParams` tensors are
(rows, n_groups). ``quantize``/``dequantize`` infer the group width from the shapes (cols / n_groups),
so one column ``W[:, j:j+1]`` with the parameters of its group, ``qp.select(k)``, works: that is how
GPTQ quantizes column by column.

Formats.

* ``int{b}``, b = 2..8 (IST-DASLab ``gptq`` ``Quantizer`` convention, as in GPTQ checkpoints): codes
  q ∈ 0..2ᵇ−1, value = scale·(q − zero). Symmetric: zero = 2ᵇ⁻¹ and scale = 2·max|w| / (2ᵇ−1).
  Asymmetric: the range is widened to contain 0, scale = (max − min) / (2ᵇ−1) and the integer
  zero = round(−min / scale), so 0.0 is always exactly representable (code ``zero``). Scales are
  rounded to fp16, the precision a GPTQ checkpoint stores them in.
* llama.cpp blocks of 32 along the row (``ggml-quants.c``, ``quantize_row_*_ref``), fp16 scale d:
  ``q8_0`` value d·q, q ∈ −127..127 (int8 codes), d = max|w| / 127;
  ``q4_0``/``q5_0`` value d·(q − 2ᵇ⁻¹), q ∈ 0..2ᵇ−1, d = max / −2ᵇ⁻¹ with max the signed value of
  largest magnitude; ``q4_1``/``q5_1`` value d·q + m, q ∈ 0..2ᵇ−1, d = (max − min) / (2ᵇ−1), m = min
  (fp16). What this module simulates is bit for bit what a GGUF file holds and what llama.cpp /
  gguf-py dequantize.

Scale search (every format, :meth:`QuantFormat.qparams` with ``mse_grid`` > 0). Candidates per group:
the reference parameters, the range shrunk by 1 − i/``mse_grid`` (clipping, IST-DASLab
``find_params(mse=True)``), and weighted least-squares refits of the step for the codes a sweep of
inverse scales gives (llama.cpp ``make_qx_quants`` behind its importance-matrix quantization; for the
asymmetric grids the step and the offset are refitted together). Each group keeps the candidate with
the smallest Σ_j h_j (w_j − ŵ_j)², h = column importance (GPTQ passes diag H: the Hessian-weighted
search). All candidates of all groups are scored in one batched pass (chunked to bound memory), so the
search costs a few elementwise passes over W per candidate, not a Python loop per group.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from llmopt.errors import LLMOptError
from llmopt.kernels.hessian import weighted_error

Tensor = torch.Tensor

GGUF_BLOCK = 32  # QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 in ggml-common.h
MSE_MAX_SHRINK = 0.5  # clipping search: range factors 1 − i/grid for 0 < i < 0.5·grid (never below half the range)
REFIT_STEPS = (-6, -4, -2, -1, 0, 1, 2, 4, 6)  # refit sweep: inverse scales (r + k/10)/max, k in REFIT_STEPS
SEARCH_CHUNK = 1 << 19  # elements of (candidates, rows, cols) scored at once (2 MiB per float32 temporary)


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
    """

    scale: Tensor
    zero: Tensor
    ref_inv_scale: Tensor | None = None
    ref_min: Tensor | None = None

    @property
    def n_groups(self) -> int:
        return self.scale.shape[-1]

    def select(self, k: int | slice) -> QParams:
        """Parameters of group k (an int gives (rows, 1)) or of a slice of groups."""
        k = slice(k, k + 1) if isinstance(k, int) else k
        return QParams(*(None if t is None else t[..., k] for t in self._fields()))

    def grouped(self) -> QParams:
        """The same parameters with a trailing unit dim, (..., rows, n_groups, 1): they broadcast over
        the weights of a group laid out as (..., rows, n_groups, group_size)."""
        return QParams(*(None if t is None else t.unsqueeze(-1) for t in self._fields()))

    def take(self, index: Tensor) -> QParams:
        """Per group, the candidate ``index`` (rows, n_groups) of stacked candidates (C, rows, n_groups)."""
        i = index.unsqueeze(0)
        return QParams(self.scale.gather(0, i)[0], self.zero.gather(0, i)[0])

    def on_grid(self) -> QParams:
        """The same grid without llama.cpp's reference rounding: quantize picks the nearest grid point."""
        return replace(self, ref_inv_scale=None, ref_min=None)

    @staticmethod
    def cat(parts: list[QParams]) -> QParams:
        """Concatenate parameters of consecutive groups along the group dim."""
        fields = list(zip(*(p._fields() for p in parts)))
        return QParams(*(None if any(t is None for t in f) else torch.cat(f, dim=-1) for f in fields))

    @staticmethod
    def cat_rows(parts: list[QParams]) -> QParams:
        """Concatenate parameters of consecutive row slices along the row dim."""
        fields = list(zip(*(p._fields() for p in parts)))
        return QParams(*(None if any(t is None for t in f) else torch.cat(f, dim=-2) for f in fields))

    @staticmethod
    def cat_candidates(parts: list[QParams]) -> QParams:
        """Stack search candidates (C_i, rows, n_groups) along the candidate dim (scale and zero only)."""
        return QParams(torch.cat([p.scale for p in parts]), torch.cat([p.zero for p in parts]))

    def _fields(self) -> tuple[Tensor | None, ...]:
        return self.scale, self.zero, self.ref_inv_scale, self.ref_min


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


def _fp16(t: Tensor) -> Tensor:
    """Round to the nearest fp16 value (ties to even, as numpy's astype), kept in float32."""
    return t.to(torch.float16).to(torch.float32)


def _split_groups(W: Tensor, n_groups: int) -> Tensor:
    """(..., rows, cols) → (..., rows, n_groups, cols / n_groups): contiguous groups along the last dim."""
    cols = W.shape[-1]
    if n_groups == 0 or cols % n_groups:
        raise ValueError(f"{cols} columns cannot be split into {n_groups} equal groups")
    return W.reshape(*W.shape[:-1], n_groups, cols // n_groups)


def _lsq_step(Wg: Tensor, l: Tensor, imp: Tensor) -> Tensor:
    """Best step d for fixed codes l: argmin_d Σ_j imp_j (w_j − d·l_j)² = Σ imp·w·l / Σ imp·l².

    Wg, l: (..., rows, n_groups, g); imp: (1, n_groups, g). Returns (..., rows, n_groups).
    """
    return _safe_div((l * (imp * Wg)).sum(-1), (l * l).mul_(imp).sum(-1))


def _lsq_affine(Wg: Tensor, l: Tensor, imp: Tensor) -> tuple[Tensor, Tensor]:
    """Best (d, m) for fixed codes l: argmin Σ_j imp_j (w_j − d·l_j − m)², the 2×2 normal equations.

    Wg, l: (..., rows, n_groups, g); imp: (1, n_groups, g). Returns d, m: (..., rows, n_groups); where the
    system is singular (all codes equal) d = 0 and m = the weighted mean.
    """
    s0, s1, s2 = imp.sum(-1), (imp * l).sum(-1), (imp * l * l).sum(-1)
    t0, t1 = (imp * Wg).sum(-1), (imp * Wg * l).sum(-1)
    det = s0 * s2 - s1 * s1
    ok = det > 1e-12 * s0 * s2
    d = torch.where(ok, _safe_div(s0 * t1 - s1 * t0, det), torch.zeros_like(det))
    m = torch.where(ok, _safe_div(s2 * t0 - s1 * t1, det), _safe_div(t0, s0))
    return d, m


def _safe_inverse(d: Tensor) -> Tensor:
    """1/d with 0 where d == 0 (ggml: ``id = d ? 1.0f/d : 0.0f``)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _safe_div(x: Tensor, d: Tensor) -> Tensor:
    """x / d, with 0 where d == 0."""
    return torch.where(d == 0, torch.zeros_like(x), x / torch.where(d == 0, torch.ones_like(d), d))


def _round_half_away(x: Tensor) -> Tensor:
    """C ``roundf``: round half away from zero, with gguf-py's exact float32 formula (``np_roundf``)."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _pow2_divisors(n: int, below: int) -> list[int]:
    """Powers of two in [8, below) that divide n, largest first."""
    return [g for g in (2**k for k in range(12, 2, -1)) if g < below and n % g == 0]


class QuantFormat(ABC):
    """A quantization number format (see the module docstring for the grids).

    name:       "int4", "q4_0", ...
    bits:       bits per code.
    group_size: columns sharing one scale, along the input dim; None = one group per output row.
    symmetric:  grid symmetric around 0 without a stored zero-point / min.
    gguf_type:  the GGML tensor type holding this format, None if GGUF has none.
    code_dtype: torch dtype of the codes (uint8, or int8 for q8_0).
    """

    name: str
    bits: int
    group_size: int | None
    symmetric: bool
    gguf_type: GGMLQuantizationType | None
    code_dtype: torch.dtype = torch.uint8

    # --- what subclasses define -----------------------------------------------------------------
    @abstractmethod
    def _range_params(self, Wg: Tensor, shrink: float | Tensor) -> QParams:
        """Reference parameters of each group of Wg: (rows, n_groups, g), range scaled by ``shrink``.

        ``shrink`` may be a float or a (C, 1, 1) tensor of factors; the result is then (C, rows, n_groups).
        """

    @abstractmethod
    def _q(self, Wg: Tensor, qp: QParams) -> Tensor:
        """Codes of grouped weights Wg: (..., rows, n_groups, g), qp grouped: (..., rows, n_groups, 1)."""

    @abstractmethod
    def _dq(self, codes: Tensor, qp: QParams) -> Tensor:
        """Float32 values of grouped codes, the shapes of :meth:`_q`."""

    @abstractmethod
    def bits_per_weight(self, in_features: int | None = None) -> float:
        """Storage bits per weight, code plus per-group scale/zero/min overhead."""

    def _refit_candidates(self, Wg: Tensor, imp: Tensor) -> QParams | None:
        """Least-squares refits for the search: QParams (K, rows, n_groups) on the stored grid, or None.

        Wg: (rows, n_groups, g); imp: (1, n_groups, g) column importance.
        """
        return None

    # --- shared behaviour -----------------------------------------------------------------------
    def quantize(self, W: Tensor, qp: QParams) -> Tensor:
        """Codes of W: (..., rows, k·n_groups) on the grid of qp: (..., rows, n_groups), same shape as W.

        The group width k is inferred from the shapes, so one column with its group's parameters works
        (GPTQ quantizes column by column). Leading dims broadcast (the search scores candidates (C, ...)).
        """
        Wg = _split_groups(W, qp.n_groups)
        codes = self._q(Wg, qp.grouped())
        return codes.reshape(*codes.shape[:-2], -1)

    def dequantize(self, codes: Tensor, qp: QParams) -> Tensor:
        """Float32 values of codes: (..., rows, k·n_groups) → the same shape."""
        vals = self._dq(_split_groups(codes, qp.n_groups), qp.grouped())
        return vals.reshape(*vals.shape[:-2], -1)

    def round_column(self, w: Tensor, qp: QParams) -> tuple[Tensor, Tensor]:
        """Codes and values of one column w: (rows,) with its group's parameters already grouped (a (rows, 1)
        selection's :meth:`QParams.grouped`, (rows, 1, 1)): what ``quantize`` and ``dequantize`` give for it,
        without their per-call reshapes (GPTQ's column walk calls this once per column)."""
        codes = self._q(w.view(-1, 1, 1), qp)
        return codes.view(-1), self._dq(codes, qp).view(-1)

    def levels(self, codes: Tensor, qp: QParams) -> Tensor | None:
        """l with value = scale·l for every weight (rows, cols), or None where the value also has an offset
        of its own (q4_1/q5_1's min): what a refit of the scales for fixed codes needs."""
        return self.dequantize(codes, replace(qp.on_grid(), scale=torch.ones_like(qp.scale)))

    def fake_quantize(self, W: Tensor, qp: QParams) -> Tensor:
        """dequantize(quantize(W)): W: (rows, cols) → the float32 grid values W rounds to."""
        return self.dequantize(self.quantize(W, qp), qp)

    def check_width(self, in_features: int, layer: str | None = None) -> None:
        """Raise :class:`LLMOptError` when the group size does not divide ``in_features``."""
        g = self.group_size
        if g is None or in_features % g == 0:
            return
        of = f" of {layer}" if layer else ""
        if self.gguf_type is not None:
            raise LLMOptError(
                f"{self.name} blocks of {g} do not divide in_features={in_features}{of}; "
                "use an int format per channel (group_size=None) for this layer or leave it unquantized"
            )
        fits = _pow2_divisors(in_features, g)[:2]
        hint = " or ".join(map(str, fits)) if fits else "group_size=None (one group per output row)"
        raise LLMOptError(f"group size {g} does not divide in_features={in_features}{of}; use {hint}")

    def qparams(self, W: Tensor, mse_grid: int = 0, weight: Tensor | None = None) -> QParams:
        """Per-group parameters for W: (rows, cols) → QParams (rows, n_groups).

        mse_grid = 0: the round-to-nearest reference choice (min/max, or llama.cpp's ``_ref`` rule).
        mse_grid > 0: the scale search of the module docstring: the reference, the range shrunk by
        1 − i/mse_grid for 0 < i < MSE_MAX_SHRINK·mse_grid, and the format's least-squares refits
        (:meth:`_refit_candidates`, which may also widen the range); per group the candidate with the
        smallest Σ_j weight_j (w_j − ŵ_j)² wins (weight: (cols,) column importance, e.g. diag(H), or
        (rows, cols) per-weight importance; None = plain MSE). The result rounds to the nearest grid point
        (:meth:`QParams.on_grid`) and is never worse than the reference under that error (the reference is
        candidate 0, ties keep it).
        """
        rows, cols = W.shape
        self.check_width(cols)
        W = W.detach().to(torch.float32)
        per_weight = weight is not None and weight.dim() == 2  # (rows, cols) importances, not one per column
        if mse_grid > 0:
            # Rows are independent: score them in slices, so no (candidates, rows, cols) temporary of the
            # search exceeds SEARCH_CHUNK elements (one 1536-wide Linear would take ~80 MiB at once).
            n_cands = math.ceil(MSE_MAX_SHRINK * mse_grid) + len(REFIT_STEPS)
            step = max(1, SEARCH_CHUNK // (cols * n_cands))
            if step < rows:
                return QParams.cat_rows([
                    self.qparams(W[r : r + step], mse_grid, weight[r : r + step] if per_weight else weight)
                    for r in range(0, rows, step)
                ])  # fmt: skip
        g = self.group_size or cols
        Wg = W.reshape(rows, cols // g, g)  # (rows, n_groups, g)
        qp = self._range_params(Wg, 1.0)
        if mse_grid <= 0:
            return qp
        if per_weight:
            imp = weight.detach().to(device=W.device, dtype=torch.float32).reshape(rows, cols // g, g)
        else:
            imp = torch.ones(cols) if weight is None else weight.detach().to(torch.float32).reshape(cols)
            imp = imp.to(W.device).reshape(1, cols // g, g)
        n_shrink = max(1, math.ceil(MSE_MAX_SHRINK * mse_grid))
        factors = 1 - torch.arange(n_shrink, dtype=torch.float32, device=W.device) / mse_grid  # 1.0 first
        cands = self._range_params(Wg, factors.view(-1, 1, 1)).on_grid()  # (C, rows, n_groups)
        refits = self._refit_candidates(Wg, imp)
        if refits is not None:
            cands = QParams.cat_candidates([cands, refits])
        return cands.take(self._search_errors(Wg, imp, cands).argmin(0))  # argmin: first minimum (ties: ref)

    def _search_errors(self, Wg: Tensor, imp: Tensor, cands: QParams) -> Tensor:
        """Σ_j imp_j (w_j − ŵ_j)² per candidate and group: (C, rows, n_groups), in chunks of candidates."""
        C = cands.scale.shape[0]
        step = max(1, SEARCH_CHUNK // Wg.numel())
        out = []
        for c0 in range(0, C, step):
            part = QParams(cands.scale[c0 : c0 + step], cands.zero[c0 : c0 + step]).grouped()
            err = self._fake(Wg, part).sub_(Wg)  # (c, rows, n_groups, g)
            out.append(err.square_().mul_(imp).sum(-1))
        return torch.cat(out)

    def _fake(self, Wg: Tensor, qp: QParams) -> Tensor:
        """On-grid values of grouped weights (a fresh tensor): what ``_dq(_q(Wg, qp), qp)`` gives for
        parameters without llama.cpp's reference rounding; formats override it with fewer passes."""
        return self._dq(self._q(Wg, qp), qp)

    @staticmethod
    def _fake_symmetric(
        Wg: Tensor, d: Tensor, lo: Tensor | float, hi: Tensor | float, m: Tensor | None = None
    ) -> Tensor:
        """d·clamp(round((w − m)·(1/d)), lo, hi) (+ m), 0 where d == 0: the grid value nearest to w in a few
        passes (the shared fast path of :meth:`_fake`; 1/d instead of a division by d can only differ on
        exact ties, which do not matter for scoring candidates)."""
        x = Wg if m is None else Wg - m
        x = x * _safe_inverse(d)
        x = x.clamp_(lo, hi).round_().mul_(d)  # round(clamp(x)) == clamp(round(x)) for integer bounds
        return x if m is None else x.add_(m)

    def to_gguf_blocks(self, codes: Tensor, qp: QParams) -> np.ndarray:
        """Pack codes + params as GGUF bytes: uint8 (rows, n_blocks · bytes_per_block)."""
        raise LLMOptError(f"{self} has no GGUF tensor type; use q8_0, q4_0, q4_1, q5_0 or q5_1 for GGUF export")

    def from_gguf_blocks(self, data: np.ndarray) -> tuple[Tensor, QParams]:
        """Inverse of :meth:`to_gguf_blocks`: uint8 (rows, n_bytes) → (codes, QParams)."""
        raise LLMOptError(f"{self} has no GGUF tensor type; use q8_0, q4_0, q4_1, q5_0 or q5_1")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class IntFormat(QuantFormat):
    """b-bit integer grid, value = scale·(q − zero), q ∈ 0..2ᵇ−1 (IST-DASLab ``gptq`` ``Quantizer``).

    Symmetric: zero = 2ᵇ⁻¹, scale = 2·max|w| / (2ᵇ−1) (so +max|w| is slightly clipped, as in GPTQ).
    Asymmetric: [min, max] widened to contain 0, scale = (max − min)/(2ᵇ−1), zero = round(−min/scale)
    clamped to the code range; value 0 is exactly code ``zero``. Scales are rounded to fp16 first.
    An all-zero group gets the range [−1, 1] (any scale; its codes all decode to 0).
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = True

    gguf_type = None
    code_dtype = torch.uint8

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"int{self.bits}"

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def __str__(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"

    def bits_per_weight(self, in_features: int | None = None) -> float:
        """b + (16 [fp16 scale] + b [packed zero-point, asym only]) / group size.

        Per-channel formats amortise the overhead over ``in_features`` when given, else ignore it.
        No act-order index is counted (act-order here always uses static, contiguous groups).
        """
        g = self.group_size or in_features
        overhead = 16 + (0 if self.symmetric else self.bits)
        return self.bits + (overhead / g if g else 0.0)

    def _range_params(self, Wg: Tensor, shrink: float) -> QParams:
        xmin = Wg.amin(-1).clamp(max=0) * shrink  # (rows, n_groups)
        xmax = Wg.amax(-1).clamp(min=0) * shrink
        if self.symmetric:
            amax = torch.maximum(-xmin, xmax)
            amax = torch.where(amax == 0, torch.ones_like(amax), amax)
            scale = _fp16(2 * amax / self.maxq).clamp(min=2**-24)  # smallest fp16 subnormal
            zero = torch.full_like(scale, 2 ** (self.bits - 1))
        else:
            empty = (xmin == 0) & (xmax == 0)
            xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
            xmax = torch.where(empty, torch.ones_like(xmax), xmax)
            scale = _fp16((xmax - xmin) / self.maxq).clamp(min=2**-24)
            zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        return QParams(scale, zero)

    def _q(self, Wg: Tensor, qp: QParams) -> Tensor:
        return (torch.round(Wg / qp.scale) + qp.zero).clamp(0, self.maxq).to(torch.uint8)

    def _dq(self, codes: Tensor, qp: QParams) -> Tensor:
        return qp.scale * (codes.to(torch.float32) - qp.zero)

    def _fake(self, Wg: Tensor, qp: QParams) -> Tensor:
        # round(w/s) + z clamped to [0, maxq], minus z  ==  round(w/s) clamped to [−z, maxq − z] (z integer)
        if self.symmetric:  # z = 2ᵇ⁻¹ everywhere: scalar bounds are much faster than tensor ones
            half = 2 ** (self.bits - 1)
            return self._fake_symmetric(Wg, qp.scale, -float(half), float(half - 1))
        return self._fake_symmetric(Wg, qp.scale, -qp.zero, self.maxq - qp.zero)

    def _refit_candidates(self, Wg: Tensor, imp: Tensor) -> QParams:
        """Symmetric: for inverse scales (maxq/2 + k/10)/max|w|, round to codes l ∈ [−2ᵇ⁻¹, 2ᵇ⁻¹−1] and
        refit the step d = Σ imp·w·l / Σ imp·l². Asymmetric: codes from the range shrunk by 1 − k/20
        (k ≥ 0 of REFIT_STEPS), then step and offset refitted together, the zero-point rounded to an integer.
        """
        if self.symmetric:
            half = 2 ** (self.bits - 1)
            amax = Wg.abs().amax(-1, keepdim=True)  # (rows, nb, 1)
            k = torch.tensor(REFIT_STEPS, dtype=torch.float32, device=Wg.device).view(-1, 1, 1, 1)
            l = (_safe_div(self.maxq / 2 + k / 10, amax) * Wg).clamp_(-half, half - 1).round_()  # (K, rows, nb, g)
            scale = _fp16(_lsq_step(Wg, l, imp)).clamp(min=2**-24)
            return QParams(scale, torch.full_like(scale, half))
        f = 1 - torch.tensor([k for k in REFIT_STEPS if k >= 0], dtype=torch.float32, device=Wg.device) / 20
        start = self._range_params(Wg, f.view(-1, 1, 1))  # (K, rows, nb)
        l = self._q(Wg, start.grouped()).to(torch.float32)  # (K, rows, nb, g) codes 0..maxq
        d, m = _lsq_affine(Wg, l, imp)  # value = d·l + m = d·(l − zero) with zero = −m/d
        scale = _fp16(d.abs()).clamp(min=2**-24)
        zero = torch.round(_safe_div(-m, scale)).clamp(0, self.maxq)
        bad = d <= 0  # degenerate fit: keep the starting parameters
        return QParams(torch.where(bad, start.scale, scale), torch.where(bad, start.zero, zero))


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
        return QParams(_fp16(d), torch.zeros_like(d), ref_inv_scale=_safe_inverse(d))

    def _q(self, Wg: Tensor, qp: QParams) -> Tensor:
        if qp.ref_inv_scale is not None:  # ggml: roundf(x · id), id from the unrounded d
            q = _round_half_away(Wg * qp.ref_inv_scale)
        else:
            q = torch.round(_safe_div(Wg, qp.scale))
        return q.clamp(-127, 127).to(torch.int8)

    def _dq(self, codes: Tensor, qp: QParams) -> Tensor:
        return codes.to(torch.float32) * qp.scale  # gguf-py: x · d

    def _fake(self, Wg: Tensor, qp: QParams) -> Tensor:
        return self._fake_symmetric(Wg, qp.scale, -127.0, 127.0)

    def _refit_candidates(self, Wg: Tensor, imp: Tensor) -> QParams:
        """Inverse scales (127 + k/10)/max|w|, codes l ∈ [−127, 127], step refitted: Σ imp·w·l / Σ imp·l²."""
        amax = Wg.abs().amax(-1, keepdim=True)
        k = torch.tensor(REFIT_STEPS, dtype=torch.float32, device=Wg.device).view(-1, 1, 1, 1)
        l = (_safe_div(127 + k / 10, amax) * Wg).clamp_(-127, 127).round_()
        d = _fp16(_lsq_step(Wg, l, imp))
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
        return QParams(_fp16(d), torch.zeros_like(d), ref_inv_scale=_safe_inverse(d))

    def _refit_candidates(self, Wg: Tensor, imp: Tensor) -> QParams:
        """Weighted least-squares scales, as llama.cpp's ``make_qx_quants`` (rmse_type 1) behind its
        importance-matrix quantization: for inverse scales −(o + k/10)/max, k in REFIT_STEPS, round to codes
        l ∈ [−o, o−1], then refit d = Σ_j imp_j·w_j·l_j / Σ_j imp_j·l_j², the best step for those codes.
        Unlike shrinking the range, this can also widen it. Wg: (rows, nb, g); imp: (1, nb, g)."""
        o = self.offset
        mx = Wg.gather(-1, Wg.abs().argmax(-1, keepdim=True))  # (rows, nb, 1) signed max
        k = torch.tensor(REFIT_STEPS, dtype=torch.float32, device=Wg.device).view(-1, 1, 1, 1)
        l = (_safe_div(-(o + k / 10), mx) * Wg).clamp_(-o, o - 1).round_()  # (K, rows, nb, g)
        d = _fp16(_lsq_step(Wg, l, imp))  # (K, rows, nb)
        return QParams(d, torch.zeros_like(d))

    def _q(self, Wg: Tensor, qp: QParams) -> Tensor:
        o = self.offset
        if qp.ref_inv_scale is not None:  # ggml: MIN(2ᵇ−1, (int8_t)(x·id + o + 0.5f))
            q = torch.trunc(Wg * qp.ref_inv_scale + (o + 0.5))
        else:
            q = torch.round(_safe_div(Wg, qp.scale)) + o
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
        return QParams(_fp16(d), _fp16(mn), ref_inv_scale=_safe_inverse(d), ref_min=mn)

    def _q(self, Wg: Tensor, qp: QParams) -> Tensor:
        if qp.ref_inv_scale is not None and qp.ref_min is not None:  # ggml: (x − min)·id + 0.5f
            q = torch.trunc((Wg - qp.ref_min) * qp.ref_inv_scale + 0.5)
        else:
            q = torch.round(_safe_div(Wg - qp.zero, qp.scale))
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
        d, m = _lsq_affine(Wg, l, imp)
        bad = d <= 0
        return QParams(torch.where(bad, start.scale, _fp16(d)), torch.where(bad, start.zero, _fp16(m)))


class _Q4_0(_SignedMaxBlock):
    name, bits, gguf_type = "q4_0", 4, GGMLQuantizationType.Q4_0


class _Q5_0(_SignedMaxBlock):
    name, bits, gguf_type = "q5_0", 5, GGMLQuantizationType.Q5_0


class _Q4_1(_MinBlock):
    name, bits, gguf_type = "q4_1", 4, GGMLQuantizationType.Q4_1


class _Q5_1(_MinBlock):
    name, bits, gguf_type = "q5_1", 5, GGMLQuantizationType.Q5_1


GGUF_FORMATS: dict[str, QuantFormat] = {f.name: f for f in (_Q8_0(), _Q4_0(), _Q4_1(), _Q5_0(), _Q5_1())}
FORMAT_NAMES = ("int", *GGUF_FORMATS)


def make_format(
    name: str, bits: int | None = None, group_size: int | None = None, symmetric: bool = True
) -> QuantFormat:
    """Format by name: "int" (with bits 2..8; "int4" also works) or a GGUF block format.

    GGUF block formats have fixed bits and blocks of 32 (``group_size`` must be 32 or None) and
    ignore ``symmetric`` (q4_1/q5_1 are asymmetric by construction).
    """
    key = name.strip().lower()
    if key.startswith("int") and key[3:].isdigit():
        named = int(key[3:])
        if bits is not None and bits != named:
            raise LLMOptError(f"format {name!r} says {named} bits but bits={bits}; give one of them")
        key, bits = "int", named
    if key == "int":
        if bits is None:
            raise LLMOptError("format 'int' needs bits in 2..8, e.g. bits=4")
        if not 2 <= bits <= 8:
            raise LLMOptError(f"bits must be in 2..8, got {bits}")
        if group_size is not None and group_size < 1:
            raise LLMOptError(f"group size must be a positive integer or None (per channel), got {group_size}")
        return IntFormat(bits, group_size, symmetric)
    fmt = GGUF_FORMATS.get(key)
    if fmt is None:
        raise LLMOptError(f"unknown quantization format {name!r}; valid: {', '.join(FORMAT_NAMES)}")
    if group_size not in (None, GGUF_BLOCK):
        raise LLMOptError(f"{key} uses fixed blocks of {GGUF_BLOCK}; set group_size to {GGUF_BLOCK} or leave it out")
    if bits is not None and bits != fmt.bits:
        raise LLMOptError(f"{key} has {fmt.bits} bits, got bits={bits}; leave bits out for GGUF formats")
    return fmt


def rtn_quantize(
    W: Tensor, fmt: QuantFormat, mse_grid: int = 0, weight: Tensor | None = None, H: Tensor | None = None
) -> QuantResult:
    """Round-to-nearest: per-group params from ``fmt.qparams`` then each weight on its own grid.

    W: (out, in). With mse_grid = 0 a GGUF format reproduces ``gguf.quants.quantize`` byte for byte.
    H: optional (in, in) Hessian for ``loss`` = tr((W − Ŵ) H (W − Ŵ)ᵀ) (nan without it).
    """
    W = W.detach().to(torch.float32)
    qp = fmt.qparams(W, mse_grid=mse_grid, weight=weight)
    codes = fmt.quantize(W, qp)
    W_hat = fmt.dequantize(codes, qp)
    loss = weighted_error(W, W_hat, H) if H is not None else math.nan
    return QuantResult(codes=codes, qparams=qp, weight=W_hat, loss=loss)
