"""Per-architecture facts: which HF model types llama.cpp runs the same way, and their GGUF metadata.

Follows llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``, ``Qwen2Model``, ``Qwen3Model``,
``Phi3MiniModel``, ``Gemma2Model``, ``Gemma3Model``, ``GPT2Model``) and what ``src/models/<arch>.cpp``
reads back. Every difference between what transformers computes and what llama.cpp would compute from
the file is either written into the file (metadata, a folded scale) or refused with a one-line
:class:`LLMOptError` before any weight is read: a GGUF export never silently becomes another model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from llmopt.errors import LLMOptError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """How one HF ``model_type`` becomes a llama.cpp architecture.

    arch: the GGUF architecture. permute_qk: Q/K rows reordered for llama.cpp's "normal" rotary
    (adjacent pairs; HF rotates halves) — only LLAMA, every other rotary arch here is NEOX-style.
    norm_shift: added to every ``*norm.weight`` (Gemma's RMSNorm multiplies by 1 + w; llama.cpp by w).
    swa: llama.cpp implements this arch's sliding-window layers. tied_only: llama.cpp always uses
    the token embedding as output head. attn_fold: where the ratio of HF's query scaling to
    llama.cpp's fixed one is folded (``q_proj`` weight rows, or the ``q_norm`` weight), None when the
    arch has no ``query_pre_attn_scalar``.
    """

    model_type: str
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_shift: float = 0.0
    swa: bool = False
    tied_only: bool = False
    attn_fold: str | None = None
    act: tuple[str, ...] = ("silu",)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
ARCHS: dict[str, ArchSpec] = {
    s.model_type: s
    for s in (
        ArchSpec("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
        ArchSpec("mistral", gguf.MODEL_ARCH.LLAMA, permute_qk=True),  # convert_hf_to_gguf.py: Mistral as llama
        ArchSpec("qwen2", gguf.MODEL_ARCH.QWEN2),
        ArchSpec("qwen3", gguf.MODEL_ARCH.QWEN3),
        ArchSpec("phi3", gguf.MODEL_ARCH.PHI3),
        ArchSpec(
            "gemma2",
            gguf.MODEL_ARCH.GEMMA2,
            norm_shift=1.0,
            swa=True,
            tied_only=True,
            attn_fold="q_proj",
            act=_GELU_TANH,
        ),
        ArchSpec("gemma3_text", gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, swa=True, attn_fold="q_norm", act=_GELU_TANH),
        ArchSpec("gpt2", gguf.MODEL_ARCH.GPT2, act=_GELU_TANH),
    )
}
SUPPORTED = tuple(ARCHS)
_WHY_NOT = {
    "opt": "llama.cpp has no OPT architecture",
    "gemma3": "this is the multimodal Gemma3ForConditionalGeneration; export its text model (Gemma3ForCausalLM, "
    "model_type gemma3_text)",
}


def arch_of(model_type: str | None) -> ArchSpec:
    """The :class:`ArchSpec` of an HF ``model_type``, or a one-line error naming the supported ones."""
    spec = ARCHS.get(model_type or "")
    if spec is None:
        why = f" ({_WHY_NOT[model_type]})" if model_type in _WHY_NOT else ""
        raise LLMOptError(
            f"GGUF export does not support model_type {model_type!r}{why}; supported: {', '.join(SUPPORTED)}"
        )
    return spec


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def sliding_layers(cfg: Any) -> list[bool]:
    """Which decoder layers transformers runs with a sliding window (all False when none does)."""
    n = cfg.num_hidden_layers
    if getattr(cfg, "sliding_window", None) is None:
        return [False] * n
    types = getattr(cfg, "layer_types", None)
    if types:
        return [t == "sliding_attention" for t in types]
    if hasattr(cfg, "use_sliding_window"):  # qwen2 / qwen3 before layer_types
        first = getattr(cfg, "max_window_layers", 0)
        return [bool(cfg.use_sliding_window) and i >= first for i in range(n)]
    return [True] * n  # mistral, phi3: every layer when a window is set


def check_config(cfg: Any) -> ArchSpec:
    """Everything that decides whether llama.cpp computes what transformers computes, from the config only.

    Raises a one-line :class:`LLMOptError` for an unsupported architecture or setting; returns the arch.
    """
    spec = arch_of(getattr(cfg, "model_type", None))
    mt = spec.model_type
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    act = getattr(cfg, "activation_function", act)
    if act not in spec.act:
        raise LLMOptError(f"{mt} with activation {act!r}: llama.cpp's {spec.name} uses {spec.act[0]}")
    if mt == "gpt2":
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or not getattr(cfg, "scale_attn_weights", True):
            raise LLMOptError("gpt2 with non-standard attention scaling (scale_attn_*) has no llama.cpp equivalent")
        return spec
    swa = sliding_layers(cfg)
    window, ctx = getattr(cfg, "sliding_window", None), cfg.max_position_embeddings
    if any(swa) and not spec.swa:
        if window < ctx:
            raise LLMOptError(
                f"{mt} attends within a sliding window of {window} tokens on {sum(swa)} of {len(swa)} layers, but "
                f"llama.cpp's {spec.name} has no sliding window: the GGUF would be another model beyond {window} "
                "tokens; refusing (a checkpoint without a window has sliding_window null / use_sliding_window false)"
            )
        log.warning("%s sliding window %d >= context %d: it never applies; llama.cpp ignores it", mt, window, ctx)
    if mt == "gemma2":
        if not getattr(cfg, "attn_logit_softcapping", None) or not getattr(cfg, "final_logit_softcapping", None):
            raise LLMOptError(
                "gemma2 without attention / final logit softcapping: llama.cpp's gemma2 always applies both"
            )
        if not getattr(cfg, "tie_word_embeddings", True):
            raise LLMOptError("gemma2 with an untied lm_head: llama.cpp's gemma2 always uses the token embedding")
    if mt == "gemma3_text" and getattr(cfg, "attn_logit_softcapping", None):
        raise LLMOptError("gemma3 with attn_logit_softcapping: llama.cpp's gemma3 has no attention softcapping")
    kind, _ = _rope_scaling(cfg)  # raises for kinds llama.cpp lacks
    if kind == "llama3" and spec.arch != gguf.MODEL_ARCH.LLAMA:
        raise LLMOptError(f"{mt} with llama3 rope scaling: llama.cpp reads its rope factors for llama models only")
    if spec.attn_fold:
        attn_fold_factor(spec, cfg)
    return spec


def _rope_scaling(cfg: Any) -> tuple[str, dict]:
    rs = getattr(cfg, "rope_scaling", None) or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise LLMOptError(f"rope scaling {kind!r} has no llama.cpp equivalent; supported: linear, yarn, llama3")
    return kind, rs


def attn_fold_factor(spec: ArchSpec, cfg: Any) -> float:
    """Gemma: HF scales queries by query_pre_attn_scalar^-½; llama.cpp by a constant it derives from the
    shapes (``f_attention_scale`` in src/models/gemma2.cpp, gemma3.cpp). Returns their ratio (1.0 when
    equal), folded into the query path by the tensor writer."""
    if spec.attn_fold is None:
        return 1.0
    n_head = cfg.num_attention_heads
    big = cfg.num_hidden_layers == (46 if spec.arch == gguf.MODEL_ARCH.GEMMA2 else 62)  # llama.cpp's "27B"
    llama = 1.0 / math.sqrt(cfg.hidden_size // n_head if big else head_dim(cfg))
    hf = float(getattr(cfg, "query_pre_attn_scalar", None) or head_dim(cfg)) ** -0.5
    ratio = hf / llama
    return 1.0 if abs(ratio - 1.0) < 1e-12 else ratio


def write_hparams(w: gguf.GGUFWriter, spec: ArchSpec, cfg: Any) -> None:
    """Architecture metadata (``convert_hf_to_gguf.py`` ``set_gguf_parameters`` of each model class)."""
    if spec.arch == gguf.MODEL_ARCH.GPT2:
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(getattr(cfg, "n_inner", None) or 4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(float(cfg.layer_norm_epsilon))
        w.add_vocab_size(cfg.vocab_size)
        return
    n_head, hd = cfg.num_attention_heads, head_dim(cfg)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_head)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", 10000.0)))
    if hd != cfg.hidden_size // n_head or spec.attn_fold:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if spec.arch == gguf.MODEL_ARCH.PHI3:
        w.add_rope_dimension_count(int(getattr(cfg, "partial_rotary_factor", 1.0) * cfg.hidden_size) // n_head)
        if getattr(cfg, "original_max_position_embeddings", None):
            w.add_rope_scaling_orig_ctx_len(int(cfg.original_max_position_embeddings))
        w.add_sliding_window(0)  # refused above when a window would apply
    else:
        w.add_rope_dimension_count(hd)
    w.add_vocab_size(cfg.vocab_size)
    kind, rs = _rope_scaling(cfg)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
    if spec.arch == gguf.MODEL_ARCH.GEMMA2:
        w.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    if spec.arch == gguf.MODEL_ARCH.GEMMA3:
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
        w.add_rope_freq_base_swa(float(getattr(cfg, "rope_local_base_freq", 10000.0)))
    swa = sliding_layers(cfg)
    if spec.swa and any(swa):
        w.add_sliding_window(int(cfg.sliding_window))
        w.add_sliding_window_pattern(swa)  # per-layer flags: llama.cpp's default pattern may differ
    elif spec.arch == gguf.MODEL_ARCH.GEMMA2:
        w.add_sliding_window_pattern(swa)  # all dense (llama.cpp's gemma2 would otherwise alternate)


def llama3_rope_factors(cfg: Any) -> np.ndarray | None:
    """Per-frequency divisors of Llama 3.1 rope scaling (``LlamaModel.generate_extra_tensors``)."""
    kind, rs = _rope_scaling(cfg)
    if kind != "llama3":
        return None
    base = float(getattr(cfg, "rope_theta", 10000.0))
    dim = head_dim(cfg)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
