"""Quantization number formats: grid, rounding, storage, and GGUF block layout.

A format only answers questions; it never runs an algorithm. RTN (:func:`rtn_quantize`) and GPTQ
(:mod:`llmopt.kernels.gptq`) ask it for per-group parameters (:meth:`QuantFormat.qparams`), for the
code of each weight (:meth:`QuantFormat.quantize`) and for the float value of a code
(:meth:`QuantFormat.dequantize`).

Modules, one job each:

* :mod:`.params`: :class:`QParams` (per-group scales / zero-points) and :class:`QuantResult` (a kernel's output).
* :mod:`.base`: the :class:`QuantFormat` interface (groups, codes and values, the width check).
* :mod:`.integer`: ``int{b}`` grids, b = 2..8 (:class:`IntFormat`).
* :mod:`.ggml_legacy`: llama.cpp's q8_0 / q4_0 / q4_1 / q5_0 / q5_1 blocks and their GGUF bytes.
* :mod:`.superblock`: the base of the two-level formats (K-quants, IQ4_XS): super-blocks of 256 weights
  with fp16 d / dmin and integer sub-block scale codes, chosen per super-block as llama.cpp does.
* :mod:`.kquant_min` (+ :mod:`.kquant_fits`): q2_K, q4_K, q5_K (scales and mins; llama.cpp's
  ``make_qkx2/3_quants``, ``make_qp_quants``).
* :mod:`.kquant_sym` (+ :mod:`.kquant_sym_fits`): q3_K, q6_K (signed scales; ``make_qx_quants``,
  ``make_q3_quants``).
* :mod:`.iq4`: iq4_nl (blocks of 32) and iq4_xs (super-blocks), the fixed non-linear 16-value grid.
* :mod:`.search`: the scale / clipping search behind ``qparams(mse_grid > 0)``.
* :mod:`.refit`: weighted least-squares steps (and offsets) for fixed codes, used by the search.
* :mod:`.numeric`: elementwise helpers (fp16 rounding, C ``roundf``, division by scales that may be 0).
* :mod:`.registry`: names → formats (:func:`make_format`, ``GGUF_FORMATS``); each GGUF family is a
  module of its own whose formats are listed in ``registry.GGUF_FAMILIES``.
* :mod:`.rtn`: round-to-nearest (:func:`rtn_quantize`).

Module constants are read where they are defined (e.g. the search's ``SEARCH_CHUNK`` in
:mod:`.search`): the names re-exported here are copies.
"""

from llmopt.formats.base import QuantFormat
from llmopt.formats.ggml_legacy import GGUF_BLOCK
from llmopt.formats.integer import IntFormat
from llmopt.formats.params import QParams, QuantResult
from llmopt.formats.refit import REFIT_STEPS
from llmopt.formats.registry import FORMAT_NAMES, GGUF_FORMATS, make_format
from llmopt.formats.rtn import rtn_quantize
from llmopt.formats.search import MSE_MAX_SHRINK, SEARCH_CHUNK

__all__ = [
    "FORMAT_NAMES",
    "GGUF_BLOCK",
    "GGUF_FORMATS",
    "MSE_MAX_SHRINK",
    "REFIT_STEPS",
    "SEARCH_CHUNK",
    "IntFormat",
    "QParams",
    "QuantFormat",
    "QuantResult",
    "make_format",
    "rtn_quantize",
]
