"""``--type auto`` on a folder quantized onto a llama.cpp block format (q4_0, q4_1, q5_0, q5_1, q8_0): every
tensor without stored codes gets the type llama.cpp's quantizer gives it in a file of that type
(:mod:`llmopt.core.llama_types`), so the file is never larger than llama.cpp's own.

The file type is the format of most quantized Linears. Whether llama.cpp's choice "with an importance
matrix" applies (Q4_0 / Q5_0: the first n_layer/8 ffn_down in Q4_1 / Q5_1) is read off the stored codes:
the choice that more of them follow (a GPTQ ``mixture: llama.cpp`` folder: with; RTN: without). Folders
quantized to an ``int`` format have no llama.cpp file type and keep F16 for the rest.

Types the writer produces itself (gguf-py's reference quantizers: q8_0, q4_0, q4_1, q5_0, q5_1, and F16)
are written directly; others (Q6_K for a head whose rows are a multiple of 256, ...) are written F32 and
converted by llama.cpp's own quantizer afterwards (:func:`.quantize.llama_retype`), which copies every
other tensor unchanged.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import gguf

from llmopt.core.llama_types import ModelFacts, is_70b, model_types
from llmopt.exporters.gguf.codes import GGUF_EXACT, StoredLinear
from llmopt.exporters.gguf.hparams import ArchSpec

log = logging.getLogger(__name__)

GGMLType = gguf.GGMLQuantizationType


@dataclass
class LlamaMix:
    """llama.cpp's choice for a file: its type name, whether with an importance matrix, every tensor's type
    (GGUF name → type; None: llama.cpp does not quantize it)."""

    ftype: str
    imatrix: bool
    types: dict[str, GGMLType | None]


@dataclass
class Deferred:
    """Tensors written F32 for llama.cpp's quantizer to convert afterwards (GGUF name → type), and the
    file type it is told."""

    ftype: str = ""
    types: dict[str, GGMLType] = field(default_factory=dict)


def file_type(stored: Mapping[str, StoredLinear]) -> str | None:
    """llama.cpp's file type of a quantized folder: the block format of most Linears, else None."""
    counts = Counter(s.fmt.name for s in stored.values())
    name = counts.most_common(1)[0][0] if counts else None
    return name if name in GGUF_EXACT else None


def model_facts(cfg: Any, spec: ArchSpec) -> ModelFacts:
    """The model facts llama.cpp's choice reads, from an HF config."""
    n_layer = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    n_head = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    n_expert = next((getattr(cfg, k) for k in ("num_local_experts", "num_experts") if getattr(cfg, k, None)), 0)
    return ModelFacts(
        n_layer, n_head, n_kv, int(n_expert), arch=spec.name, is_70b=is_70b(spec.name, n_layer, n_head, n_kv)
    )


def llama_mix(
    stored: Mapping[str, StoredLinear],
    shapes: Mapping[str, tuple[int, ...]],
    coded: Mapping[str, GGMLType],
    cfg: Any,
    spec: ArchSpec,
) -> LlamaMix | None:
    """llama.cpp's types for the tensors of a quantized folder (None for an int-quantized one).

    shapes: every GGUF tensor (name → numpy shape); coded: the GGUF type of those written from stored codes.
    """
    ftype = file_type(stored)
    if ftype is None:
        return None
    facts = model_facts(cfg, spec)
    agree = {}
    for imatrix in (False, True):
        types = model_types(ftype, shapes, facts, imatrix)
        agree[imatrix] = (sum(types.get(n) == t for n, t in coded.items()), types)
    imatrix = agree[True][0] > agree[False][0]
    mix = LlamaMix(ftype, imatrix, agree[imatrix][1])
    off = {n: (t.name, mix.types.get(n)) for n, t in coded.items() if mix.types.get(n) != t}
    if off:
        log.info(
            "%d coded tensors differ from llama.cpp's %s types (e.g. %s)", len(off), ftype, next(iter(off.items()))
        )
    log.info(
        "--type auto: tensors without stored codes in llama.cpp's types for a %s file%s",
        ftype.upper(),
        " made with an importance matrix" if imatrix else "",
    )
    return mix
