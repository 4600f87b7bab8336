"""llama.cpp's own quantizer through llama-cpp-python's ctypes bindings (``llama_model_quantize``).

Used for ``--type q4_k_m`` and every other llama.cpp type: an all-F32 GGUF is written first, then
llama.cpp converts it, optionally guided by an importance matrix (:mod:`.imatrix`). And by ``--type auto``
for the tensors whose llama.cpp type the writer cannot produce (:func:`llama_retype`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from pathlib import Path

import gguf
import numpy as np

from llmopt.errors import LLMOptError
from llmopt.exporters.gguf.plan import LLAMA_FTYPES, Plan

log = logging.getLogger(__name__)


def llama_quantize(
    src: Path, dst: Path, plan: Plan, imatrix: dict[str, np.ndarray] | None, threads: int | None
) -> None:
    """``llama_model_quantize(src → dst)`` with ``plan``'s ftype, embedding/output types and imatrix."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[plan.dense]
    params.nthread = threads or os.cpu_count() or 1
    if plan.embedding:
        params.token_embedding_type = int(gguf.GGMLQuantizationType[plan.embedding.upper()])
    if plan.output:
        params.output_tensor_type = int(gguf.GGMLQuantizationType[plan.output.upper()])
    keep = []  # ctypes buffers must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            buf = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(buf)
            entries[i].name = name.encode()
            entries[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = buf.size
        entries[len(imatrix)].name = None  # the list ends with a NULL name (llama-quant.cpp)
        params.imatrix = entries
        keep.append(entries)
    _run(src, dst, params, plan.dense)


def llama_retype(src: Path, dst: Path, ftype: str, types: dict[str, gguf.GGMLQuantizationType], threads: int | None):
    """Convert the tensors ``types`` names (F32 in ``src``) to their type with llama.cpp's quantizer (no
    importance matrix) and copy every other tensor unchanged, as llama.cpp does with a tensor already in its
    target type; checked: each of those is byte for byte the same in ``dst``. ``ftype``: the file type."""
    import llama_cpp

    reader = gguf.GGUFReader(src)
    targets = {t.name: types.get(t.name, t.tensor_type) for t in reader.tensors if len(t.shape) >= 2}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ftype]
    params.nthread = threads or os.cpu_count() or 1
    overrides = (llama_cpp.llama_model_tensor_override * (len(targets) + 1))()
    for i, (name, qtype) in enumerate(targets.items()):  # every 2-D tensor named, so none is re-chosen
        overrides[i].pattern = f"^{re.escape(name)}$".encode()
        overrides[i].type = int(qtype)
    overrides[len(targets)].pattern = None
    params.tt_overrides = overrides
    _run(src, dst, params, ftype)
    out = {t.name: t for t in gguf.GGUFReader(dst).tensors}
    for t in reader.tensors:
        got = out.get(t.name)
        want = types.get(t.name, t.tensor_type)
        if got is None or got.tensor_type != want or list(got.shape) != list(t.shape):
            raise LLMOptError(f"internal: llama.cpp wrote {t.name} as {got and got.tensor_type.name}, not {want.name}")
        if t.name not in types and not np.array_equal(_raw(got), _raw(t)):
            raise LLMOptError(f"internal: llama.cpp changed the bytes of {t.name}")


def _raw(t: gguf.ReaderTensor) -> np.ndarray:
    return np.asarray(t.data).reshape(-1).view(np.uint8)


def _run(src: Path, dst: Path, params, what: str) -> None:
    import llama_cpp

    errors: list[str] = []
    with capture_llama_log(errors):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        reason = errors[-1].strip() if errors else f"return code {rc}"
        raise LLMOptError(f"llama.cpp could not quantize to {what}: {reason}")


class capture_llama_log:
    """Route llama.cpp's log to ``logging`` (debug) while quantizing; keep warnings/errors for messages."""

    def __init__(self, sink: list[str]):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.sink = sink

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            msg = text.decode("utf-8", "replace")
            if level in (2, 3):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
                self.sink.append(msg)
            log.debug("llama.cpp: %s", msg.rstrip())

        self._callback = callback

    def __enter__(self):
        self._llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc) -> None:
        from llama_cpp import _logger

        self._llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
