"""The tensor types llama.cpp's quantizer writes for a file type, per tensor (no llama.cpp needed).

A Python port of ``llama_tensor_get_type`` and what it calls (``tensor_allows_quantization``,
``llama_tensor_get_type_impl``, ``tensor_type_fallback``, ``llama_ftype_get_default_type``) in
``src/llama-quant.cpp`` of llama.cpp commit 0c1e570 (2026-10-01), the llama.cpp that llama-cpp-python
0.3.36 vendors. Covered: the legacy file types (Q4_0 ... Q8_0), the K mixes (Q2_K, Q2_K_S, Q3_K_S/M/L,
Q4_K_S/M, Q5_K_S/M, Q6_K), the IQ mixes (IQ1_S ... IQ4_XS), TQ1_0/TQ2_0, F16/BF16/F32. Not ported:
MXFP4_MOE / NVFP4 / Q1_0 / Q2_0 file types and the GLM5-NEXT / multimodal special cases (llmopt writes none).

llama.cpp visits tensors sorted by layer, then name, and counts attn_v-like and ffn tensors as it goes;
:func:`model_types` does the same for a whole file, :func:`tensor_type` takes the tensor's own layer as
its position (the same for every model with one such tensor per layer). Checked against llama.cpp's own
quantizer in ``tests/test_llama_types.py``.

It sits in the bottom layer (no llmopt import) because two layers read it: the GGUF exporter's ``--type auto``
(:mod:`llmopt.exporters.gguf.auto_types`) and the quantization stage's ``head: auto`` (the output head's type).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import gguf

T = gguf.GGMLQuantizationType

# llama_ftype_get_default_type: the type of every quantizable tensor before the per-tensor rules.
DEFAULT_TYPE: dict[str, T] = {
    "f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0,
    "q5_1": T.Q5_1, "q8_0": T.Q8_0, "q2_k": T.Q2_K, "q2_k_s": T.Q2_K, "q3_k_s": T.Q3_K, "q3_k_m": T.Q3_K,
    "q3_k_l": T.Q3_K, "q4_k_s": T.Q4_K, "q4_k_m": T.Q4_K, "q5_k_s": T.Q5_K, "q5_k_m": T.Q5_K, "q6_k": T.Q6_K,
    "iq2_xxs": T.IQ2_XXS, "iq2_xs": T.IQ2_XS, "iq2_s": T.IQ2_XS, "iq2_m": T.IQ2_S, "iq3_xxs": T.IQ3_XXS,
    "iq3_xs": T.IQ3_S, "iq3_s": T.IQ3_S, "iq3_m": T.IQ3_S, "iq1_s": T.IQ1_S, "iq1_m": T.IQ1_M,
    "iq4_nl": T.IQ4_NL, "iq4_xs": T.IQ4_XS, "tq1_0": T.TQ1_0, "tq2_0": T.TQ2_0,
}  # fmt: skip
_FLOATS = (T.F32, T.F16, T.BF16)
_IQ_LOW = frozenset({"iq2_xxs", "iq2_xs", "iq1_s", "iq2_s", "iq2_m", "iq1_m"})  # their own branch
# tensor_type_fallback: 256-wide types → a 32-wide type when a row is not a multiple of 256
_FALLBACK = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0,
    T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}  # fmt: skip
# tensor_allows_quantization: name parts never quantized (architectures llmopt may meet)
_KEEP_PARTS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
)  # fmt: skip
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's choice reads from the model besides the tensor itself.

    n_layer: decoder blocks (``hparams.n_layer_all``); n_head / n_head_kv: attention heads of layer 0
    (n_gqa = n_head // n_head_kv); n_expert: routed experts (0 for a dense model); has_output: the file has
    an ``output.weight`` (False: tied, the token embedding gets the output's type); arch: llama.cpp's name
    (only ``falcon`` changes a choice); is_70b: llama.cpp's LLM_TYPE_70B (:func:`is_70b`);
    n_attention_wv: attn_v / attn_qkv / attn_kv_b tensors in the file (None: one per layer).
    """

    n_layer: int
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0
    has_output: bool = True
    arch: str = "llama"
    is_70b: bool = False
    n_attention_wv: int | None = None

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


def is_70b(arch: str, n_layer: int, n_head: int, n_head_kv: int) -> bool:
    """llama.cpp's LLM_TYPE_70B (the only model size its quantizer looks at), as each loader sets it."""
    if arch == "llama":
        return n_layer == 80 and n_head != n_head_kv
    return (arch in ("qwen2", "deci", "olmo") and n_layer == 80) or (arch == "jais2" and n_layer == 68)


def category(name: str) -> str:
    """llama.cpp's ``tensor_get_category`` (substring tests, in its order)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
                 "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):  # fmt: skip
        if part in name:
            return part.removesuffix(".weight")
    return "other"


def allows_quantization(name: str, ndim: int) -> bool:
    """llama.cpp's ``tensor_allows_quantization``: 2-D/3-D weights other than norms, routers, positions..."""
    if ndim < 2 or not name.endswith("weight") or name in _KEEP_NAMES:
        return False
    return not any(part in name for part in _KEEP_PARTS)


def block_size(t: T) -> int:
    return gguf.GGML_QUANT_SIZES[t][0]


def fallback(t: T, ncols: int) -> T:
    """``tensor_type_fallback``: a type whose blocks fit a row of ``ncols``; F16 when none does."""
    if ncols % block_size(t) == 0:
        return t
    if t in _FALLBACK:
        t = _FALLBACK[t]
    elif block_size(t) > 32:
        raise ValueError(f"llama.cpp defines no fallback for {t.name}")
    return t if ncols % block_size(t) == 0 else T.F16


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(
    ftype: str,
    name: str,
    shape: tuple[int, ...],
    facts: ModelFacts,
    imatrix: bool = False,
    *,
    output_type: T | None = None,
    embedding_type: T | None = None,
    position: int | None = None,
) -> T | None:
    """The ggml type llama.cpp's quantizer gives tensor ``name`` in a file of type ``ftype``.

    ftype: llama.cpp's name, lower case (``q4_0``, ``q4_k_m``, ``iq4_xs``, ...); name: the GGUF tensor name
    (``token_embd.weight``, ``blk.3.attn_v.weight``, ...); shape: numpy order (..., rows, columns);
    imatrix: an importance matrix is given; output_type / embedding_type: llama.cpp's
    ``--output-tensor-type`` / ``--token-embedding-type``; position: the tensor's index among the
    attn_v-like / same-kind ffn tensors llama.cpp visited before it (default: its layer).
    Returns None for a tensor llama.cpp does not quantize (1-D, norms, routers, ...): it keeps its type.
    """
    default = DEFAULT_TYPE.get(ftype)
    if default is None:
        raise ValueError(f"unknown llama.cpp file type {ftype!r}; known: {', '.join(DEFAULT_TYPE)}")
    if not allows_quantization(name, len(shape)):
        return None
    cat = category(name)
    if embedding_type is not None and cat == "token_embd":
        return embedding_type
    if output_type is not None and cat == "output":
        return output_type
    if default in _FLOATS:
        return default
    if position is None:
        m = _LAYER.match(name)
        position = int(m.group(1)) if m else 0
    t = _mixture(ftype, default, name, cat, shape[-1], facts, imatrix, output_type, position)
    return fallback(t, shape[-1])


def _mixture(
    ftype: str, t: T, name: str, cat: str, ncols: int, f: ModelFacts, imatrix: bool, output_type: T | None, i: int
) -> T:
    """``llama_tensor_get_type_impl``: ``t`` is the file type's default type; ``i`` the tensor's position."""
    falcon, n_expert = f.arch == "falcon", f.n_expert
    if cat == "output" or (not f.has_output and cat == "token_embd"):
        if output_type is not None:
            return output_type
        if falcon or ncols % block_size(t):
            return T.Q8_0
        if ftype in ("iq2_xxs", "iq2_xs", "iq3_xxs", "iq1_s", "iq2_s", "iq2_m", "iq1_m"):
            return T.Q5_K
        return t if t == T.Q8_0 else T.Q6_K
    if cat == "token_embd":
        if ftype in ("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m"):
            return T.Q2_K
        if ftype in ("iq2_s", "iq2_m", "iq3_xxs"):
            return T.IQ3_S
        return T.Q4_K if ftype in ("tq1_0", "tq2_0") else t
    attn_v = cat in ("attn_v", "attn_qkv", "attn_kv_b")
    n_wv = f.n_attention_wv if f.n_attention_wv is not None else f.n_layer
    n = f.n_layer  # llama.cpp's n_ffn_down / n_ffn_gate / n_ffn_up
    if ftype in _IQ_LOW:
        iq2s = ftype in ("iq2_s", "iq2_m")
        if attn_v:
            if f.n_gqa >= 4 or n_expert >= 4:
                return T.Q4_K
            return T.IQ3_S if iq2s else T.Q2_K
        if n_expert == 8 and cat == "attn_k":
            return T.Q4_K
        if cat == "ffn_down":
            return (T.IQ3_S if iq2s else T.Q2_K) if i < n // 8 else t
        if cat == "attn_output":
            if n_expert == 8:
                return T.Q5_K
            if ftype in ("iq1_s", "iq1_m"):
                return T.IQ2_XXS
            return T.IQ3_S if iq2s else t
        return t
    if attn_v:
        if ftype == "q2_k":
            t = T.Q4_K if f.n_gqa >= 4 else T.Q3_K
        elif ftype == "q2_k_s" and f.n_gqa >= 4:
            t = T.Q4_K
        elif ftype == "iq3_xxs":
            t = T.Q4_K if f.n_gqa >= 4 else T.IQ3_XXS if imatrix else T.IQ3_S
        elif ftype in ("iq3_xs", "iq3_s") and f.n_gqa >= 4:
            t = T.Q4_K
        elif ftype == "iq3_m":
            t = T.Q4_K
        elif ftype == "q3_k_m":
            t = T.Q5_K if i < 2 else T.Q4_K
        elif ftype == "q3_k_l":
            t = T.Q5_K
        elif ftype in ("iq4_nl", "iq4_xs") and f.n_gqa >= 4:
            t = T.Q5_K
        elif ftype in ("q4_k_m", "q5_k_m") and _more_bits(i, n_wv):
            t = T.Q6_K
        elif ftype == "q4_k_s" and i < 4:
            t = T.Q5_K
        if f.is_70b and t in (T.Q3_K, T.Q4_K):
            t = T.Q5_K
        return T.Q8_0 if n_expert == 8 else t
    if cat in ("attn_k", "attn_q"):
        if cat == "attn_k" and n_expert == 8:
            return T.Q8_0
        return {"iq3_xs": T.IQ3_XXS, "iq3_xxs": T.IQ2_S}.get(ftype, t)
    if cat in ("ffn_down", "ffn_gate", "ffn_up") and n_expert > 1:  # llama.cpp's layer_info: the layer named
        m = _LAYER.match(name)
        if m is None or not 0 <= int(m.group(1)) < n:
            raise ValueError(f"cannot tell the layer of {name} (n_layer {n})")
        i = int(m.group(1))
    if cat == "ffn_down":
        return _ffn_down(ftype, t, i, n, f, imatrix)
    if cat == "attn_output":
        if falcon:
            return T.Q4_K if ftype == "q3_k_l" else t
        if n_expert == 8:
            bump = ("q2_k", "iq3_xs", "iq3_xxs", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq3_s",
                    "iq3_m", "iq4_xs")  # fmt: skip
            return T.Q5_K if ftype in bump else t
        return {"q2_k": T.Q3_K, "iq3_xxs": T.IQ3_S, "q3_k_m": T.Q4_K, "q3_k_l": T.Q5_K, "iq3_m": T.Q4_K}.get(ftype, t)
    if cat in ("ffn_gate", "ffn_up"):
        return T.IQ3_XXS if ftype == "iq3_xs" and n // 8 <= i < 7 * n // 8 else t
    return t


def _ffn_down(ftype: str, t: T, i: int, n: int, f: ModelFacts, imatrix: bool) -> T:
    """The ffn_down branch of ``llama_tensor_get_type_impl`` (``i``: the layer, ``n``: n_layer)."""
    falcon = f.arch == "falcon"
    if ftype == "q2_k":
        return T.Q3_K
    if ftype == "q2_k_s":
        return T.Q4_K if i < n // 8 else t
    if ftype == "iq3_xxs" and not imatrix:
        return T.Q4_K if i < n // 8 else T.Q3_K
    if ftype == "q3_k_m":
        return T.Q5_K if i < n // 16 else T.Q4_K if not falcon or _more_bits(i, n) else T.Q3_K
    if ftype == "iq3_m" and (i < n // 8 or (f.n_expert == 8 and _more_bits(i, n))):
        return T.Q4_K
    if ftype == "q3_k_l":
        return T.Q4_K if falcon else T.Q5_K
    if ftype == "q4_k_m":
        if falcon:
            return T.Q6_K if i < n // 16 else T.Q5_K if _more_bits(i, n) else T.Q4_K
        return T.Q6_K if _more_bits(i, n) else t
    if i < n // 8 and ftype in ("iq4_nl", "iq4_xs") and not imatrix:
        return T.Q5_K
    if ftype == "q5_k_m" and _more_bits(i, n):
        return T.Q6_K
    if ftype == "q4_k_s" and not falcon and i < n // 8:
        return T.Q5_K
    if ftype in ("q4_0", "q5_0") and imatrix and i < n // 8:  # llama.cpp's guard for the first ffn_down
        return T.Q4_1 if ftype == "q4_0" else T.Q5_1
    return t


def _sort_key(name: str) -> tuple[int, str]:
    """llama.cpp's ``weight_name_comparer``: by layer (none first), then by name."""
    m = _LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


def model_types(
    ftype: str,
    shapes: Mapping[str, tuple[int, ...]],
    facts: ModelFacts,
    imatrix: bool = False,
    *,
    output_type: T | None = None,
    embedding_type: T | None = None,
) -> dict[str, T | None]:
    """:func:`tensor_type` of every tensor of a file (GGUF name → numpy shape), counting positions and
    the attn_v-like tensors, and telling a tied embedding by the absence of ``output.weight``, as llama.cpp
    does. Tensors llama.cpp does not quantize map to None."""
    names = sorted(shapes, key=_sort_key)
    cats = {n: category(n) for n in names}
    n_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats.values())
    facts = replace(facts, has_output="output.weight" in shapes, n_attention_wv=n_wv)
    seen: dict[str, int] = {}
    out: dict[str, T | None] = {}
    for name in names:
        kind = "attn_v" if cats[name] in ("attn_v", "attn_qkv", "attn_kv_b") else cats[name]
        pos = seen.get(kind, 0)
        out[name] = tensor_type(
            ftype, name, shapes[name], facts, imatrix, output_type=output_type, embedding_type=embedding_type,
            position=pos,
        )  # fmt: skip
        if out[name] is not None and kind in ("attn_v", "ffn_down", "ffn_gate", "ffn_up"):
            seen[kind] = pos + 1
    return out
