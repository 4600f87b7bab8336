"""Format names → formats: :func:`make_format`, and the place where a named format registers.

``int`` (``int2``..``int8``) builds an :class:`~llmopt.formats.integer.IntFormat`; every other name is a
GGUF block format of ``GGUF_FORMATS``. A family of GGUF formats (the legacy blocks today; K-quants and
IQ4_NL / IQ4_XS next) lives in a module of its own that exports a tuple of format instances, listed in
``GGUF_FAMILIES`` below: that tuple is the one place a format's name is registered.
"""

from __future__ import annotations

from llmopt.errors import LLMOptError
from llmopt.formats.base import QuantFormat
from llmopt.formats.ggml_legacy import LEGACY_FORMATS
from llmopt.formats.integer import IntFormat
from llmopt.formats.iq4 import IQ4_FORMATS
from llmopt.formats.kquant_min import KQUANT_MIN_FORMATS
from llmopt.formats.kquant_sym import KQUANT_SYM_FORMATS

# The registry's order: legacy blocks, K-quants (q2_K, q3_K, q4_K, q5_K, q6_K as families), IQ4
GGUF_FAMILIES: tuple[tuple[QuantFormat, ...], ...] = (
    LEGACY_FORMATS,
    KQUANT_MIN_FORMATS,
    KQUANT_SYM_FORMATS,
    IQ4_FORMATS,
)
GGUF_FORMATS: dict[str, QuantFormat] = {f.name: f for family in GGUF_FAMILIES for f in family}
FORMAT_NAMES = ("int", *GGUF_FORMATS)
_BY_KEY = {n.lower(): f for n, f in GGUF_FORMATS.items()}


def make_format(
    name: str, bits: int | None = None, group_size: int | None = None, symmetric: bool = True
) -> QuantFormat:
    """Format by name: "int" (with bits 2..8; "int4" also works) or a GGUF block format.

    GGUF block formats have fixed bits and blocks (32 for q8_0..q5_1; ``group_size`` must be the
    block or None) and ignore ``symmetric`` (q4_1/q5_1 are asymmetric by construction).
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
    fmt = _BY_KEY.get(key)  # any case: "q4_k" is "q4_K"
    if fmt is None:
        raise LLMOptError(f"unknown quantization format {name!r}; valid: {', '.join(FORMAT_NAMES)}")
    key = fmt.name
    if group_size not in (None, fmt.group_size):
        block = fmt.group_size
        raise LLMOptError(f"{key} uses fixed blocks of {block}; set group_size to {block} or leave it out")
    if bits is not None and bits != fmt.bits:
        raise LLMOptError(f"{key} has {fmt.bits} bits, got bits={bits}; leave bits out for GGUF formats")
    return fmt
