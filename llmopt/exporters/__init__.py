"""Exporters: an llmopt model (or any model spec) → a file another runtime loads.

``export_gguf`` writes a llama.cpp GGUF; weights an llmopt recipe quantized to a GGUF block format are
written from their stored codes and scales, byte for byte, never re-quantized. ``export_onnx`` writes an
ONNX Runtime folder (optimum-onnx's exporter, KV cache); with ``quant="auto"`` the stored 4-bit codes
become ``MatMulNBits`` initializers, bit for bit. ``export`` dispatches on the target name.
"""

from llmopt.errors import LLMOptError
from llmopt.exporters.gguf import GGUF_TYPES, export_gguf

EXPORT_TARGETS = ("gguf", "onnx")

__all__ = ["EXPORT_TARGETS", "GGUF_TYPES", "ONNX_QUANTS", "export", "export_gguf", "export_onnx"]


def export_onnx(model_spec: str, output: str, **kwargs) -> dict:
    """See :func:`llmopt.exporters.onnx.export_onnx` (imported lazily: onnx/optimum load only when used)."""
    from llmopt.exporters.onnx import export_onnx as _export_onnx

    return _export_onnx(model_spec, output, **kwargs)


def export(model_spec: str, to: str, output: str, **kwargs) -> dict:
    """Export ``model_spec`` to ``to`` (``gguf`` or ``onnx``) at ``output``; keyword arguments go to
    :func:`export_gguf` / :func:`export_onnx`."""
    if to == "gguf":
        return export_gguf(model_spec, output, **kwargs)
    if to == "onnx":
        return export_onnx(model_spec, output, **kwargs)
    raise LLMOptError(f"unknown export target '{to}'; valid targets: {', '.join(EXPORT_TARGETS)}")


def __getattr__(name: str):
    if name == "ONNX_QUANTS":
        from llmopt.exporters.onnx import ONNX_QUANTS

        return ONNX_QUANTS
    raise AttributeError(name)
