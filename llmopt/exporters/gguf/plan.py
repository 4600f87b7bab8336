"""What ``--type`` / ``--embedding-type`` / ``--output-type`` ask for: the GGML types of each kind of tensor.

``auto``, ``f32`` and ``f16`` are written by gguf-py's ``GGUFWriter`` alone (``mode`` auto / plain); any other
type goes through llama.cpp's own quantizer (``mode`` llama) from an all-F32 file.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from llmopt.errors import LLMOptError

# llama.cpp ``enum llama_ftype`` (include/llama.h) of the types its quantizer produces.
LLAMA_FTYPES: dict[str, int] = {
    "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12,
    "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq2_xxs": 19,
    "iq2_xs": 20, "q2_k_s": 21, "iq3_xs": 22, "iq3_xxs": 23, "iq1_s": 24, "iq4_nl": 25, "iq3_s": 26,
    "iq3_m": 27, "iq2_s": 28, "iq2_m": 29, "iq4_xs": 30, "iq1_m": 31, "bf16": 32, "tq1_0": 36, "tq2_0": 37,
}  # fmt: skip
ALIASES = {"q4_k": "q4_k_m", "q5_k": "q5_k_m", "q3_k": "q3_k_m"}
# llama.cpp refuses these without an importance matrix (llama-quant.cpp).
NEED_IMATRIX = frozenset({"iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m", "q2_k_s"})
PLAIN_TYPES = ("auto", "f32", "f16")
GGUF_TYPES: tuple[str, ...] = (*PLAIN_TYPES, *LLAMA_FTYPES)

# Types the writer itself can produce for --embedding-type / --output-type (gguf-py's reference
# quantizers are bit-exact with llama.cpp's ``quantize_row_*_ref``).
WRITER_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")

FILE_TYPE = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    gguf.GGMLQuantizationType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    gguf.GGMLQuantizationType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
}


@dataclass(frozen=True)
class Plan:
    """What to write.

    mode: ``auto`` (stored codes where there are some), ``plain`` (floats) or ``llama`` (llama.cpp quantizer).
    dense: ggml type name of the 2-D tensors; embedding / output: of the token embedding / output head
        ("" in llama mode: llama.cpp's own choice). ``explicit_*``: the user named that type.
    """

    mode: str
    dense: str
    embedding: str
    output: str
    explicit_embedding: bool = False
    explicit_output: bool = False


F32_PLAN = Plan("plain", "f32", "f32", "f32", True, True)


def ggml_type(name: str, allowed: tuple[str, ...] | None, what: str) -> str:
    """Validate a ggml type name (``allowed``, or every ggml tensor type) and return it lower-case."""
    key = name.strip().lower()
    valid = allowed or tuple(
        t.name.lower() for t in gguf.GGMLQuantizationType if t.name not in ("I8", "I16", "I32", "I64", "F64")
    )
    if key not in valid:
        raise LLMOptError(f"unknown {what} {name!r}; valid: {', '.join(valid)}")
    return key


def make_plan(type_: str, embedding_type: str | None, output_type: str | None) -> Plan:
    """The :class:`Plan` of the CLI's ``--type`` / ``--embedding-type`` / ``--output-type``."""
    key = ALIASES.get(type_.strip().lower(), type_.strip().lower())
    if key not in GGUF_TYPES:
        raise LLMOptError(f"unknown --type {type_!r}; valid: {', '.join(GGUF_TYPES)}")
    if key in PLAIN_TYPES:
        dense = "f32" if key == "f32" else "f16"
        emb = ggml_type(embedding_type, WRITER_TYPES, "--embedding-type") if embedding_type else dense
        outp = ggml_type(output_type, WRITER_TYPES, "--output-type") if output_type else dense
        return Plan("plain" if key != "auto" else "auto", dense, emb, outp, bool(embedding_type), bool(output_type))
    emb = ggml_type(embedding_type, None, "--embedding-type") if embedding_type else ""
    outp = ggml_type(output_type, None, "--output-type") if output_type else ""
    return Plan("llama", key, emb, outp, bool(embedding_type), bool(output_type))
