"""Cutting a Llama-layout model down to kept indices: new, smaller Linears, norms, embeddings and
config. Every cut equals zeroing what it removes in the original model (tested):

* MLP channel j: rows j of gate/up and column j of down (act(0)·0 = 0);
* GQA group g: its K/V rows, its query heads' q rows and o columns;
* hidden channel c: column c of the embedding (and output matrix), of every Linear reading the
  residual stream, row c of every Linear writing it, entry c of every RMSNorm. RMSNorm averages x²
  over the hidden size, so on H' of H channels the norms get weight · √(H/H') and ε · H/H'
  (x/√(a·m + ε) = a^(-½) · x/√(m + ε/a) with a = H'/H): exact, not an approximation. Qwen3's per-head
  q/k norms average over head_dim, which the cut keeps, yet read the same config ε (one
  ``rms_norm_eps`` for all norms, in transformers and in llama.cpp): q_proj and k_proj rows (and
  biases) are multiplied by k = √(H/H'), so with ε·k² they give k·q/√(k²·m + k²·ε) = q/√(m + ε), exact;
* decoder layer: removed from the list (a layer with o and down zeroed is the identity), the kept
  layers renumbered for the KV cache.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmopt.kernels.structured import head_channels, heads_to_groups
from llmopt.structured.layout import Sizes


def slice_linear(lin: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding rows ``out_idx`` and columns ``in_idx`` of ``lin`` (None = all)."""
    w = lin.weight.data
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        b = lin.bias.data if out_idx is None else lin.bias.data.index_select(0, out_idx.to(w.device))
        new.bias.data.copy_(b)
    new.requires_grad_(lin.weight.requires_grad)
    return new


def prune_mlp(layer: nn.Module, keep: torch.Tensor) -> None:
    m = layer.mlp
    m.gate_proj = slice_linear(m.gate_proj, out_idx=keep)
    m.up_proj = slice_linear(m.up_proj, out_idx=keep)
    m.down_proj = slice_linear(m.down_proj, in_idx=keep)
    if hasattr(m, "intermediate_size"):
        m.intermediate_size = keep.numel()


def prune_groups(layer: nn.Module, kept_groups: torch.Tensor, s: Sizes) -> None:
    """Keep the GQA groups ``kept_groups`` (sorted) of one attention block."""
    a = layer.self_attn
    q = head_channels(heads_to_groups(kept_groups, s.heads_per_group), s.head_dim)
    kv = head_channels(kept_groups, s.head_dim)
    a.q_proj = slice_linear(a.q_proj, out_idx=q)
    a.k_proj = slice_linear(a.k_proj, out_idx=kv)
    a.v_proj = slice_linear(a.v_proj, out_idx=kv)
    a.o_proj = slice_linear(a.o_proj, in_idx=q)
    for attr, v in (
        ("num_heads", kept_groups.numel() * s.heads_per_group),
        ("num_key_value_heads", kept_groups.numel()),
    ):
        if hasattr(a, attr):  # older transformers attention classes keep the counts
            setattr(a, attr, v)


def _rms_norms(model: nn.Module) -> list[nn.Module]:
    """The RMSNorms over the residual stream (not Qwen3's per-head q/k norms)."""
    body = model.model
    out = [body.norm]
    for layer in body.layers:
        out += [layer.input_layernorm, layer.post_attention_layernorm]
    return out


def prune_hidden(model: nn.Module, keep: torch.Tensor) -> float:
    """Keep the residual-stream channels ``keep``; returns the new RMSNorm ε."""
    body = model.model
    H, Hn = model.config.hidden_size, keep.numel()
    emb = body.embed_tokens
    head = getattr(model, "lm_head", None)
    tied = head is not None and head.weight is emb.weight
    emb.weight = nn.Parameter(emb.weight.data.index_select(1, keep.to(emb.weight.device)).contiguous())
    emb.embedding_dim = Hn
    if head is not None:
        if tied:
            head.weight = emb.weight
        else:
            head.weight = nn.Parameter(head.weight.data.index_select(1, keep.to(head.weight.device)).contiguous())
        head.in_features = Hn
    for layer in body.layers:
        a, m = layer.self_attn, layer.mlp
        a.q_proj, a.k_proj, a.v_proj = (slice_linear(x, in_idx=keep) for x in (a.q_proj, a.k_proj, a.v_proj))
        a.o_proj = slice_linear(a.o_proj, out_idx=keep)
        m.gate_proj, m.up_proj = (slice_linear(x, in_idx=keep) for x in (m.gate_proj, m.up_proj))
        m.down_proj = slice_linear(m.down_proj, out_idx=keep)
        if hasattr(m, "hidden_size"):
            m.hidden_size = Hn
    scale = math.sqrt(H / Hn)
    eps = model.config.rms_norm_eps * H / Hn
    for norm in _rms_norms(model):
        w = norm.weight.data.index_select(0, keep.to(norm.weight.device))
        norm.weight = nn.Parameter((w.double() * scale).to(w.dtype))
        norm.variance_epsilon = eps
    for layer in body.layers:  # Qwen3's q/k norms read config.rms_norm_eps too: its new ε, inputs × √(H/H')
        a = layer.self_attn
        for attr, proj in (("q_norm", "q_proj"), ("k_norm", "k_proj")):
            n = getattr(a, attr, None)
            if n is not None:
                _scale_rows(getattr(a, proj), scale)
                n.variance_epsilon = eps
    return eps


@torch.no_grad()
def _scale_rows(lin: nn.Linear, factor: float) -> None:
    """Multiply a Linear's outputs by ``factor`` (weight rows and bias), rounded once from float64."""
    lin.weight.copy_((lin.weight.double() * factor).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() * factor).to(lin.bias.dtype))


def drop_layers(model: nn.Module, keep: list[int]) -> None:
    body = model.model
    body.layers = nn.ModuleList([body.layers[i] for i in keep])
    for new, layer in enumerate(body.layers):
        layer.self_attn.layer_idx = new  # the KV cache is indexed by it
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new
    types = getattr(model.config, "layer_types", None)
    if types:
        model.config.layer_types = [types[i] for i in keep]
    if hasattr(body, "has_sliding_layers") and types:
        body.has_sliding_layers = "sliding_attention" in model.config.layer_types


def set_config(model: nn.Module, s: Sizes, eps: float | None) -> None:
    c = model.config
    c.hidden_size, c.intermediate_size = s.hidden, s.intermediate
    c.num_attention_heads, c.num_key_value_heads, c.head_dim = s.heads, s.kv_heads, s.head_dim
    c.num_hidden_layers = s.layers
    if eps is not None:
        c.rms_norm_eps = eps
    if hasattr(c, "max_window_layers") and getattr(c, "layer_types", None):
        c.max_window_layers = min(c.max_window_layers, s.layers)
