"""``--type auto`` on a folder quantized onto llama.cpp block formats: every tensor without stored codes gets
the type llama.cpp's quantizer gives it in a file of the folder's file type (:mod:`llmopt.core.llama_types`),
so the file has llama.cpp's tensor types and is never larger than llama.cpp's own.

The file type is what the folder records: a stage that followed llama.cpp's mix (``mixture: llama.cpp``,
formats such as q4_k_m or q4_0) writes it into ``quantization.json`` (``llama_ftype``, with an importance
matrix: the stage calibrates). A folder without the record (made before it existed, or ``mixture: none``) is
read as the file type of the block format of most quantized Linears, and whether llama.cpp's choice "with an
importance matrix" applies (Q4_0 / Q5_0: the first n_layer/8 ffn_down in Q4_1 / Q5_1) off the stored codes:
the choice that more of them follow. Folders quantized to an ``int`` format have no llama.cpp file type and
keep F16 for the rest.

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

from llmopt.core.llama_mix import model_facts
from llmopt.core.llama_types import DEFAULT_TYPE, model_types
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


def file_type(stored: Mapping[str, StoredLinear]) -> tuple[str, bool | None] | None:
    """llama.cpp's file type of a quantized folder and whether with an importance matrix (None: to be read off
    the codes): the recorded one, else the block format of most Linears when it is a file type, else None."""
    recorded = Counter(s.llama_ftype for s in stored.values() if s.llama_ftype)
    if recorded:
        if len(recorded) > 1:
            log.warning("the folder's Linears follow several llama.cpp file types %s: using the most common", recorded)
        return recorded.most_common(1)[0][0], True
    counts = Counter(s.fmt.name for s in stored.values())
    name = counts.most_common(1)[0][0] if counts else None
    return (name.lower(), None) if name in GGUF_EXACT and name.lower() in DEFAULT_TYPE else None


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
    found = file_type(stored)
    if found is None:
        return None
    ftype, recorded = found
    facts = model_facts(cfg, spec.name)
    agree = {}
    for imatrix in (False, True) if recorded is None else (recorded,):
        types = model_types(ftype, shapes, facts, imatrix)
        agree[imatrix] = (sum(types.get(n) == t for n, t in coded.items()), types)
    imatrix = recorded if recorded is not None else agree[True][0] > agree[False][0]
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
