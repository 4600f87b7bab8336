"""llama.cpp's own quantizer on a tensor, as the oracle of the format tests.

``ggml_quantize_chunk`` (libggml-base, the function ``llama_model_quantize`` calls per tensor) through ctypes:
the GGUF bytes llama.cpp writes for an F32 matrix, with or without an importance matrix. ggml-quants.c is
compiled into libggml-base without ``-march=native`` (no FMA contraction), so its float32 arithmetic is
plain IEEE single precision, which a port can reproduce bit for bit.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType


def _lib() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.POINTER(ctypes.c_float),  # src
        ctypes.c_void_p,  # dst
        ctypes.c_int64,  # start
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.POINTER(ctypes.c_float),  # imatrix (n_per_row) or NULL
    ]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


_LIB: ctypes.CDLL | None = None


def ggml_quantize(W: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes for W: float32 (rows, cols) as ``qtype``: uint8 (rows, bytes per row).

    ``imatrix``: (cols,) float32 per-column importance (what ``llama-imatrix`` stores), or None."""
    global _LIB
    if _LIB is None:
        _LIB = _lib()
    W = np.ascontiguousarray(W, dtype=np.float32)
    rows, cols = W.shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert cols % block == 0, f"{cols} columns are not whole blocks of {block}"
    out = np.zeros((rows, cols // block * type_size), dtype=np.uint8)
    _LIB.ggml_quantize_init(int(qtype))
    imp = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imatrix.shape == (cols,)
        imp = imatrix.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    W_ptr = W.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    n = _LIB.ggml_quantize_chunk(int(qtype), W_ptr, out.ctypes.data, 0, rows, cols, imp)
    assert n == out.nbytes, (n, out.nbytes)
    return out
