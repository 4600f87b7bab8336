"""Target sizes from a structured stage's config: explicit sizes or fractions, or a parameter budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmopt.errors import LLMOptError
from llmopt.structured.config import StructuredConfig
from llmopt.structured.layout import Sizes, non_embedding_params


@dataclass
class Cut:
    """What the cut keeps (sorted indices; None: that axis is not cut): per original layer, its MLP
    channels and GQA groups; the residual-stream channels; the decoder layers. ``layers_by_loss``: how
    many layers to keep, chosen by :func:`llmopt.structured.depth.greedy_layers` once the widths are cut
    (:func:`llmopt.structured.prune` then fills ``layers``)."""

    mlp: list[torch.Tensor] | None = None
    groups: list[torch.Tensor] | None = None
    hidden: torch.Tensor | None = None
    layers: list[int] | None = None
    layers_by_loss: int | None = None


def _width(name: str, v, full: int, round_to: int) -> int:
    """A width target: a size as given (checked), or a fraction rounded down to a multiple of round_to."""
    if isinstance(v, float):
        n = max(round_to, math.floor(v * full / round_to) * round_to) if full >= round_to else full
        return min(n, full)
    if v > full:
        raise LLMOptError(f"structured {name}: {v} is larger than the model's {full}")
    return v


def _count(name: str, v, full: int) -> int:
    n = max(1, round(v * full)) if isinstance(v, float) else v
    if n > full:
        raise LLMOptError(f"structured {name}: {n} is more than the model's {full}")
    return n


def target_sizes(cfg: StructuredConfig, s: Sizes, flags: dict) -> Sizes:
    """The pruned model's sizes. Raises LLMOptError for sizes the model cannot take."""
    if cfg.params is not None:
        return _for_budget(cfg, s, flags)
    out = s
    if cfg.intermediate_size is not None:
        out = out.with_(intermediate=_width("intermediate_size", cfg.intermediate_size, s.intermediate, cfg.round_to))
    if cfg.hidden_size is not None:
        out = out.with_(hidden=_width("hidden_size", cfg.hidden_size, s.hidden, cfg.round_to))
    if cfg.num_layers is not None:
        out = out.with_(layers=_count("num_layers", cfg.num_layers, s.layers))
    if cfg.num_attention_heads is not None:
        v = cfg.num_attention_heads
        if isinstance(v, float):
            groups = max(1, round(v * s.kv_heads))
        else:
            if v > s.heads or v % s.heads_per_group:
                raise LLMOptError(
                    f"structured num_attention_heads: {v} must be a multiple of the {s.heads_per_group} query "
                    f"heads per K/V group, at most {s.heads} (whole GQA groups are removed)"
                )
            groups = v // s.heads_per_group
        out = out.with_(heads=groups * s.heads_per_group, kv_heads=groups)
    return out


def _shrunk(s: Sizes, r: float, axes: list[str], round_to: int) -> Sizes:
    out = s
    if "mlp" in axes:
        out = out.with_(intermediate=_width("intermediate_size", r, s.intermediate, round_to))
    if "hidden" in axes:
        out = out.with_(hidden=_width("hidden_size", r, s.hidden, round_to))
    if "depth" in axes:
        out = out.with_(layers=max(1, round(r * s.layers)))
    if "heads" in axes:
        g = max(1, round(r * s.kv_heads))
        out = out.with_(heads=g * s.heads_per_group, kv_heads=g)
    return out


def _for_budget(cfg: StructuredConfig, s: Sizes, flags: dict) -> Sizes:
    """The largest common keep factor r of ``axes`` whose non-embedding parameters fit ``params``."""
    budget = cfg.params * non_embedding_params(s, **flags)
    lo, hi = 0.0, 1.0  # params(lo) <= budget < params(hi) (the factor is monotone in every axis)
    for _ in range(40):
        mid = (lo + hi) / 2
        if non_embedding_params(_shrunk(s, mid, cfg.axes, cfg.round_to), **flags) <= budget:
            lo = mid
        else:
            hi = mid
    out = _shrunk(s, lo, cfg.axes, cfg.round_to)
    if non_embedding_params(out, **flags) > budget:
        raise LLMOptError(f"structured params {cfg.params}: the axes {cfg.axes} cannot shrink this model that far")
    return out
