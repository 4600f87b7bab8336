"""Exporters: an llmopt model (or any model spec) → a file another runtime loads.

``export_gguf`` writes a llama.cpp GGUF; weights an llmopt recipe quantized to a GGUF block format are
written from their stored codes and scales, byte for byte, never re-quantized.
"""

from llmopt.exporters.gguf import GGUF_TYPES, export_gguf

__all__ = ["GGUF_TYPES", "export_gguf"]
