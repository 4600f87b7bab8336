"""llama.cpp's file types on an HF model: the ggml type, and the llmopt format, of every Linear.

A llama.cpp file type (Q4_K_M, IQ4_XS, Q4_0, ...) is a mix: its quantizer gives each tensor a type by the
tensor's GGUF name, row width and position (:mod:`.llama_types`, the port of ``llama_tensor_get_type``).
A quantization stage that follows the mix (``mixture: llama.cpp``) needs what llama.cpp would see of each
Linear: its GGUF name (gguf-py's ``TensorNameMap``, as ``convert_hf_to_gguf.py`` names tensors; per-expert
Linears are one merged ``*_exps`` tensor), its shape, whether the output head is tied to the token
embedding, and the model's layer / head / expert counts (:func:`model_facts`). :func:`linear_types` reads
them off the model and returns each Linear's type; :func:`format_of` is the llmopt format that writes a type.

The stage follows llama.cpp's choice *with* an importance matrix (llmopt calibrates), so an exported
folder has the tensor types, and the size, of llama.cpp's own imatrix file of that type.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import gguf
from torch import nn

from llmopt.core.llama_types import DEFAULT_TYPE, ModelFacts, fallback, is_70b, model_types, tensor_type
from llmopt.errors import LLMOptError
from llmopt.formats import GGUF_FORMATS, QuantFormat
from llmopt.linears import in_features, is_linear, out_features

T = gguf.GGMLQuantizationType

# The llama.cpp file types a quantization stage takes as its ``format`` (llama.cpp's names, lower case).
FILE_TYPES = (
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
    "q5_k_m", "q6_k", "iq4_nl", "iq4_xs",
)  # fmt: skip
# A pruned Linear keeps its zeros only on a grid with an exact 0. These grids have none (an offset d·q + m, or
# IQ4's non-linear grid, which skips 0): such a Linear takes the type of the same size (q2_K: the next size)
# whose grid has one, as llmopt did before mixes (pruned Linears of a Q4_0 mix stayed q4_0, not q4_1).
ZERO_EXACT = {
    T.Q4_1: T.Q4_0, T.Q5_1: T.Q5_0, T.Q4_K: T.Q4_0, T.Q5_K: T.Q5_0, T.Q2_K: T.Q3_K, T.IQ4_NL: T.Q4_0,
    T.IQ4_XS: T.Q4_0,
}  # fmt: skip
# HF model types whose llama.cpp architecture has another name (convert_hf_to_gguf.py's model classes)
_ARCH_ALIASES = {"mistral": "llama", "mixtral": "llama", "gemma3_text": "gemma3", "qwen2_moe": "qwen2moe",
                 "qwen3_moe": "qwen3moe", "gpt_neox": "gptneox"}  # fmt: skip
_ARCHS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
_EXPERT = re.compile(r"\.experts\.\d+\.")


def file_type(name: str) -> str | None:
    """The llama.cpp file type ``name`` spells (any case), else None."""
    key = name.strip().lower()
    return key if key in FILE_TYPES else None


def is_mix_only(name: str) -> bool:
    """A file type that is no single llmopt format (q4_k_m, q3_k_s, ...; q4_0 and q6_K are both)."""
    key = name.strip().lower()
    return key in FILE_TYPES and key not in {n.lower() for n in GGUF_FORMATS}


def default_type(ftype: str) -> T:
    """The type of a file type's tensors before llama.cpp's per-tensor rules (q4_k_m: Q4_K)."""
    return DEFAULT_TYPE[ftype]


def format_of(t: T) -> QuantFormat:
    """The llmopt format that writes ggml type ``t`` (a one-line error when llmopt has none)."""
    for f in GGUF_FORMATS.values():
        if f.gguf_type == t:
            return f
    raise LLMOptError(
        f"llama.cpp's mix needs {t.name} blocks, which this llmopt has no format for (it has "
        f"{', '.join(GGUF_FORMATS)}); use a file type whose types it has, or mixture: none"
    )


def gguf_arch(model_type: str | None) -> gguf.MODEL_ARCH | None:
    """llama.cpp's architecture of an HF ``model_type`` (None: none of that name)."""
    key = _ARCH_ALIASES.get(model_type or "", model_type or "")
    return _ARCHS.get(key)


def model_facts(cfg: Any, arch: str) -> ModelFacts:
    """What llama.cpp's choice reads from the model besides the tensors, from an HF config. ``arch``: llama.cpp's
    architecture name (only ``falcon`` and the 70B rule look at it)."""
    n_layer = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    n_head = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    n_expert = next((getattr(cfg, k) for k in ("num_local_experts", "num_experts") if getattr(cfg, k, None)), 0)
    return ModelFacts(n_layer, n_head, n_kv, int(n_expert), arch=arch, is_70b=is_70b(arch, n_layer, n_head, n_kv))


@cache
def _generic_names(n_layer: int) -> dict[str, str]:
    """HF module name → GGUF tensor name over every architecture gguf-py knows, for a model type llama.cpp
    does not have. Where two tensor kinds claim a name, the first in gguf-py's ``MODEL_TENSOR`` order wins
    (attention and FFN kinds come before the RWKV / vision ones)."""
    cfg, block = gguf.TensorNameMap.mappings_cfg, gguf.TensorNameMap.block_mappings_cfg
    out: dict[str, str] = {}
    for kind in sorted(gguf.MODEL_TENSOR, key=int):
        for pattern in cfg.get(kind, ()):
            out.setdefault(pattern, gguf.TENSOR_NAMES[kind])
        for pattern in block.get(kind, ()):
            for bid in range(n_layer):
                out.setdefault(pattern.format(bid=bid), gguf.TENSOR_NAMES[kind].format(bid=bid))
    return out


def gguf_names(model: nn.Module) -> dict[str, str]:
    """GGUF tensor name (``blk.3.attn_v.weight``) of every Linear and of the token embedding of ``model``, by
    module name. Per-expert Linears get their merged tensor's name; a tied output head the token embedding's;
    modules gguf-py cannot name keep their own name (llama.cpp's rules treat them as "other" tensors)."""
    cfg = model.config
    n_layer = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    arch = gguf_arch(getattr(cfg, "model_type", None))
    tmap = gguf.get_tensor_name_map(arch, n_layer) if arch is not None else None
    generic = _generic_names(n_layer) if arch is None else {}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and (getattr(cfg, "tie_word_embeddings", False) or head.weight is emb.weight)
    out = {}
    for name, m in model.named_modules():
        if m is emb:
            out[name] = "token_embd.weight"
        elif m is head and tied:
            out[name] = "token_embd.weight"
        elif is_linear(m):
            key = _EXPERT.sub(".experts.", name)
            found = tmap.get_name(key) if tmap is not None else generic.get(key)
            out[name] = f"{found or name}.weight"
    return out


def linear_types(model: nn.Module, ftype: str, imatrix: bool = True) -> dict[str, T | None]:
    """The ggml type llama.cpp's quantizer gives each Linear of ``model`` (by module name) in a file of type
    ``ftype`` (with an importance matrix by default), counting positions over the whole model as llama.cpp
    does; None where llama.cpp writes F16 because no block fits a row. A tied output head gets the token
    embedding's type. A Linear llama.cpp keeps in float by its name (an MoE router, ``ffn_gate_inp``) gets the
    file type's default type (with llama.cpp's width fallback): llmopt quantizes every target of a stage."""
    if ftype not in DEFAULT_TYPE:
        raise LLMOptError(f"unknown llama.cpp file type {ftype!r}; known: {', '.join(FILE_TYPES)}")
    arch = gguf_arch(getattr(model.config, "model_type", None))
    facts = model_facts(model.config, gguf.MODEL_ARCH_NAMES[arch] if arch is not None else "")
    names = gguf_names(model)
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    experts: dict[str, int] = {}  # merged expert tensor → experts in it
    for name, g in names.items():
        m = modules[name]
        shapes[g] = tuple(m.weight.shape) if isinstance(m, nn.Embedding) else (out_features(m), in_features(m))
        if _EXPERT.search(name) and "_exps" in g:
            experts[g] = experts.get(g, 0) + 1
    for g, n in experts.items():  # (n_expert, rows, cols): one tensor for all experts of a layer
        shapes[g] = (n, *shapes[g])
    types = model_types(ftype, shapes, facts, imatrix)
    out = {}
    for name, g in names.items():
        if not is_linear(modules[name]):
            continue
        t = types[g]
        if t is None:  # kept in float by name (an MoE router): the file type's own type, as before mixes
            t = fallback(DEFAULT_TYPE[ftype], shapes[g][-1])
        out[name] = None if t in (T.F16, T.F32, T.BF16) else t  # F16: a row no block fits
    return out


@cache
def candidate_types(ftype: str) -> frozenset[T]:
    """Every type the mix ``ftype`` (with an importance matrix) can give a Linear whose rows fit some block:
    attention and FFN tensors of each layer of a 32- and an 80-layer model (llama.cpp's 70B rule), dense or
    with 8 experts, with and without grouped-query attention, falcon's layout, rows of 256k and of 32k
    weights. What a pipeline checks before any work (an export target that cannot hold one of them)."""
    facts = (
        ModelFacts(32, 8, 8), ModelFacts(32, 8, 2), ModelFacts(32, 8, 8, n_expert=8),
        ModelFacts(32, 8, 1, arch="falcon"), ModelFacts(80, 8, 1, is_70b=True),
    )  # fmt: skip
    kinds = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "other")
    out = set()
    for f in facts:
        for i in range(f.n_layer):
            for kind in kinds:
                for cols in (256, 96):
                    t = tensor_type(ftype, f"blk.{i}.{kind}.weight", (8, cols), f, True)
                    out |= {t} if t is not None else set()
    return frozenset(out - {T.F16, T.F32, T.BF16})
