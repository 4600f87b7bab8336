"""Where the structured stage finds what it prunes: the Llama layout (Llama, Mistral, Qwen2, Qwen3),
its sizes, and its non-embedding parameter count."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from llmopt.errors import LLMOptError

#: model_type → what the layout adds to Llama's (q/k/v biases, per-head q/k norms)
SUPPORTED = {"llama": {}, "mistral": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True}}


@dataclass(frozen=True)
class Sizes:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads

    def with_(self, **kw) -> Sizes:
        return replace(self, **kw)


def check_supported(model: nn.Module) -> dict:
    """The layout flags of a supported model; a one-line LLMOptError naming the supported ones otherwise."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        raise LLMOptError(
            f"the structured stage supports {', '.join(SUPPORTED)} (the Llama layout: separate q/k/v and "
            f"gate/up/down projections, RMSNorm); this model is {mt or type(model).__name__}"
        )
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "embed_tokens"):
        raise LLMOptError(f"{type(model).__name__} does not have the model.layers / model.embed_tokens layout")
    layer = body.layers[0]
    if getattr(layer.mlp, "gate_proj", None) is None or getattr(layer.self_attn, "q_proj", None) is None:
        raise LLMOptError(f"{type(model).__name__}: the structured stage needs separate q/k/v and gate/up/down Linears")
    return dict(SUPPORTED[mt])


def sizes_of(model: nn.Module) -> Sizes:
    c = model.config
    heads = c.num_attention_heads
    return Sizes(
        hidden=c.hidden_size,
        intermediate=c.intermediate_size,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        layers=c.num_hidden_layers,
    )


def non_embedding_params(s: Sizes, qkv_bias: bool = False, qk_norm: bool = False) -> int:
    """Parameters outside the token embedding and output matrix: per layer q/k/v/o, gate/up/down and two
    RMSNorms (+ biases, + per-head q/k norms), and the final norm."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = s.hidden * (q + 2 * kv) + q * s.hidden + 3 * s.hidden * s.intermediate + 2 * s.hidden
    per_layer += (q + 2 * kv) if qkv_bias else 0
    per_layer += 2 * s.head_dim if qk_norm else 0
    return s.layers * per_layer + s.hidden
