"""Two-level GGUF formats: llama.cpp's K-quants and IQ4_XS (super-blocks of 256 weights).

A row is cut into super-blocks of ``QK_K`` = 256 weights (``ggml-common.h``); each stores an fp16 ``d``
(and, for the formats with mins, an fp16 ``dmin``) and, per sub-block of 16 or 32 weights, a small integer
scale code (and min code) quantized against ``d``. The sub-block is the format's *group*
(``group_size``): every algorithm sees one effective grid per group, ``QParams.scale`` / ``zero`` as ggml
computes them from the codes (q4_K: scale = d·sc, zero = −dmin·m), and the codes themselves ride along in
``QParams.scale_code`` / ``zero_code`` / ``super_scale`` / ``super_zero`` so the GGUF bytes are exactly what
was chosen. The parameters of a whole super-block are chosen together (``param_block`` = 256 columns):
GPTQ with dynamic groups asks for them when its column walk reaches a super-block.

:meth:`SuperBlockFormat.qparams` follows llama.cpp's quantizer: without an importance (``mse_grid`` = 0 or
no ``weight``) the ``quantize_row_*_ref`` rules, with one (``weight``: (cols,) per-column importance, the
imatrix or GPTQ's diag(H)) the ``quantize_row_*_impl`` rules, byte for byte. Each family's module
implements :meth:`SuperBlockFormat._choose` and the block layout.
"""

from __future__ import annotations

import torch
from gguf.constants import GGML_QUANT_SIZES

from llmopt.errors import LLMOptError
from llmopt.formats.base import QuantFormat
from llmopt.formats.params import QParams

Tensor = torch.Tensor

QK_K = 256  # weights per super-block (ggml-common.h)


class SuperBlockFormat(QuantFormat):
    """Base of the super-block formats: the width rule, the storage size and the dispatch of ``qparams``.

    Subclasses set ``name``, ``bits``, ``group_size`` (the sub-block), ``symmetric``, ``gguf_type`` and
    ``fallback`` (the type llama.cpp's quantizer writes instead for a row that is not a multiple of 256),
    and define ``_choose``, ``_q``, ``_dq``, ``to_gguf_blocks`` and ``from_gguf_blocks``.
    """

    super_block = QK_K
    param_block = QK_K  # columns whose parameters are chosen together
    takes_imatrix = True  # qparams wants the per-column importance (llama.cpp forms per-weight weights itself)
    fallback: str = ""

    def __repr__(self) -> str:
        return f"make_format({self.name!r})"

    def bits_per_weight(self, in_features: int | None = None) -> float:
        """GGUF bytes per super-block · 8 / 256."""
        block, type_size = GGML_QUANT_SIZES[self.gguf_type]
        return type_size * 8 / block

    def check_width(self, in_features: int, layer: str | None = None) -> None:
        """Raise :class:`LLMOptError` unless rows are whole super-blocks (llama.cpp falls back then)."""
        if in_features % QK_K == 0:
            return
        of = f" of {layer}" if layer else ""
        raise LLMOptError(
            f"{self.name} needs rows that are a multiple of {QK_K} weights, in_features={in_features}{of} is not; "
            f"llama.cpp writes such a tensor as {self.fallback}: use format {self.fallback} for it "
            "(a mix recipe does this per tensor)"
        )

    def qparams(self, W: Tensor, mse_grid: int = 0, weight: Tensor | None = None) -> QParams:
        """Parameters of every group (sub-block) of W: (rows, cols), chosen per super-block as llama.cpp does.

        ``mse_grid`` = 0 or ``weight`` None: llama.cpp's reference rule (``quantize_row_*_ref``). Otherwise
        ``weight`` is the per-column importance (cols,) and llama.cpp's importance-matrix rule
        (``quantize_row_*_impl``) runs with it; the value of ``mse_grid`` only switches it on (llama.cpp's own
        search is the search). A per-weight (rows, cols) importance is refused: llama.cpp forms its per-weight
        weights from the column importance itself.
        """
        rows, cols = W.shape
        self.check_width(cols)
        W = W.detach().to(torch.float32)
        imatrix = None
        if mse_grid > 0 and weight is not None:
            if weight.dim() != 1 or weight.shape[0] != cols:
                raise LLMOptError(f"{self.name} takes a per-column importance of {cols} values (an imatrix)")
            imatrix = weight.detach().to(torch.float32)
        return self._choose(W, imatrix)

    def _choose(self, W: Tensor, imatrix: Tensor | None) -> QParams:
        """llama.cpp's choice of every super-block's parameters: W (rows, cols), imatrix (cols,) or None."""
        raise NotImplementedError

    def levels(self, codes: Tensor, qp: QParams) -> None:
        """None: GPTQ's per-group scale refit would leave the two-level grid (a scale must stay d·code)."""
        return None

    def _range_params(self, Wg: Tensor, shrink: float | Tensor) -> QParams:
        raise LLMOptError(f"{self.name} chooses its parameters per super-block (qparams), not per group")
