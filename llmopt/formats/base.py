"""The :class:`QuantFormat` interface: what every number format answers.

A format only answers questions; it never runs an algorithm. RTN (:func:`~llmopt.formats.rtn.rtn_quantize`)
and GPTQ (:mod:`llmopt.kernels.gptq`) ask it for per-group parameters (:meth:`QuantFormat.qparams`), for
the code of each weight (:meth:`QuantFormat.quantize`) and for the float value of a code
(:meth:`QuantFormat.dequantize`).

Groups. W: (rows, cols) = (out, in) is cut along the input dim into ``n_groups = cols / group_size``
contiguous groups (one group per row when ``group_size`` is None). :class:`QParams` tensors are
(rows, n_groups). ``quantize``/``dequantize`` infer the group width from the shapes (cols / n_groups),
so one column ``W[:, j:j+1]`` with the parameters of its group, ``qp.select(k)``, works: that is how
GPTQ quantizes column by column.

A format subclass defines its grid (``_range_params``, ``_q``, ``_dq``, ``bits_per_weight``), optionally
its search refits (``_refit_candidates``, :mod:`.refit`), a faster ``_fake`` and, for a GGUF type, its
block bytes (``to_gguf_blocks`` / ``from_gguf_blocks``); named formats are listed in :mod:`.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

from llmopt.errors import LLMOptError
from llmopt.formats.numeric import safe_inverse
from llmopt.formats.params import QParams
from llmopt.formats.search import search_qparams

Tensor = torch.Tensor


def _split_groups(W: Tensor, n_groups: int) -> Tensor:
    """(..., rows, cols) → (..., rows, n_groups, cols / n_groups): contiguous groups along the last dim."""
    cols = W.shape[-1]
    if n_groups == 0 or cols % n_groups:
        raise ValueError(f"{cols} columns cannot be split into {n_groups} equal groups")
    return W.reshape(*W.shape[:-1], n_groups, cols // n_groups)


def _pow2_divisors(n: int, below: int) -> list[int]:
    """Powers of two in [8, below) that divide n, largest first."""
    return [g for g in (2**k for k in range(12, 2, -1)) if g < below and n % g == 0]


class QuantFormat(ABC):
    """A quantization number format (the grids: :mod:`.integer`, :mod:`.ggml_legacy`).

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
        mse_grid > 0: the scale search of :mod:`llmopt.formats.search` (:func:`search_qparams`): the
        reference, the range shrunk by 1 − i/mse_grid for 0 < i < MSE_MAX_SHRINK·mse_grid, and the format's
        least-squares refits (:meth:`_refit_candidates`, which may also widen the range); per group the
        candidate with the smallest Σ_j weight_j (w_j − ŵ_j)² wins (weight: (cols,) column importance, e.g.
        diag(H), or (rows, cols) per-weight importance; None = plain MSE). The result rounds to the nearest
        grid point (:meth:`QParams.on_grid`) and is never worse than the reference under that error (the
        reference is candidate 0, ties keep it).
        """
        rows, cols = W.shape
        self.check_width(cols)
        W = W.detach().to(torch.float32)
        if mse_grid > 0:
            return search_qparams(self, W, mse_grid, weight)
        g = self.group_size or cols
        return self._range_params(W.reshape(rows, cols // g, g), 1.0)  # Wg: (rows, n_groups, g)

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
        x = x * safe_inverse(d)
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
