"""``int{b}`` grids, b = 2..8 (IST-DASLab ``gptq`` ``Quantizer`` convention, as in GPTQ checkpoints).

Codes q ∈ 0..2ᵇ−1, value = scale·(q − zero). Symmetric: zero = 2ᵇ⁻¹ and scale = 2·max|w| / (2ᵇ−1).
Asymmetric: the range is widened to contain 0, scale = (max − min) / (2ᵇ−1) and the integer
zero = round(−min / scale), so 0.0 is always exactly representable (code ``zero``). Scales are
rounded to fp16, the precision a GPTQ checkpoint stores them in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.formats.base import QuantFormat
from llmopt.formats.numeric import fp16, safe_div
from llmopt.formats.params import QParams
from llmopt.formats.refit import REFIT_STEPS, lsq_affine, lsq_step

Tensor = torch.Tensor


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
            scale = fp16(2 * amax / self.maxq).clamp(min=2**-24)  # smallest fp16 subnormal
            zero = torch.full_like(scale, 2 ** (self.bits - 1))
        else:
            empty = (xmin == 0) & (xmax == 0)
            xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
            xmax = torch.where(empty, torch.ones_like(xmax), xmax)
            scale = fp16((xmax - xmin) / self.maxq).clamp(min=2**-24)
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
            l = (safe_div(self.maxq / 2 + k / 10, amax) * Wg).clamp_(-half, half - 1).round_()  # (K, rows, nb, g)
            scale = fp16(lsq_step(Wg, l, imp)).clamp(min=2**-24)
            return QParams(scale, torch.full_like(scale, half))
        f = 1 - torch.tensor([k for k in REFIT_STEPS if k >= 0], dtype=torch.float32, device=Wg.device) / 20
        start = self._range_params(Wg, f.view(-1, 1, 1))  # (K, rows, nb)
        l = self._q(Wg, start.grouped()).to(torch.float32)  # (K, rows, nb, g) codes 0..maxq
        d, m = lsq_affine(Wg, l, imp)  # value = d·l + m = d·(l − zero) with zero = −m/d
        scale = fp16(d.abs()).clamp(min=2**-24)
        zero = torch.round(safe_div(-m, scale)).clamp(0, self.maxq)
        bad = d <= 0  # degenerate fit: keep the starting parameters
        return QParams(torch.where(bad, start.scale, scale), torch.where(bad, start.zero, zero))
