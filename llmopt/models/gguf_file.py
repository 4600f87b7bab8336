"""Reading a GGUF file's header with gguf-py, checked first: a corrupt or truncated file is one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmopt.errors import LLMOptError, first_line
from llmopt.models.specs import _has_gguf_magic


def read_gguf(gguf: Path) -> Any:
    """Parse and sanity-check a GGUF file; one-line LLMOptError when it is corrupt or truncated."""
    from gguf import GGUFReader

    def invalid(reason: str) -> LLMOptError:
        return LLMOptError(f"{gguf} is not a valid GGUF file ({reason}): re-download it or pass a HF folder")

    size = gguf.stat().st_size
    if size < 24:
        raise invalid("empty" if size == 0 else f"only {size} bytes")
    if not _has_gguf_magic(gguf):
        raise invalid("no GGUF magic number")
    try:
        reader = GGUFReader(gguf)
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on any malformed or cut file
        raise invalid(f"truncated or corrupt: {first_line(e)[:120]}") from e
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise invalid(f"truncated: tensor data ends at byte {end}, file has {size}")
    if "general.architecture" not in reader.fields:
        raise invalid("no general.architecture")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or not tokens.data or "tokenizer.ggml.model" not in reader.fields:
        raise invalid("no vocabulary: tokenizer.ggml.tokens / tokenizer.ggml.model missing")
    return reader


# The old name, still imported inside this package by gguf_cache and gguf_tokenizer; other packages use
# read_gguf.


def _gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()
