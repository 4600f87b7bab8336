"""Structured pruning to a smaller dense model: importance on calibration data
(:mod:`~llmopt.structured.importance`, kernels in :mod:`llmopt.kernels.structured`), target sizes
(:mod:`~llmopt.structured.plan`), and the cut itself (:mod:`~llmopt.structured.surgery`) on the Llama
layout (:mod:`~llmopt.structured.layout`)."""

from __future__ import annotations

from torch import nn

from llmopt.kernels.structured import keep_top
from llmopt.structured.config import StructuredConfig
from llmopt.structured.importance import Importance, measure
from llmopt.structured.layout import check_supported, non_embedding_params, sizes_of
from llmopt.structured.plan import target_sizes
from llmopt.structured.surgery import drop_layers, prune_groups, prune_hidden, prune_mlp, set_config

__all__ = ["StructuredConfig", "Importance", "measure", "prune", "target_sizes"]


def prune(model: nn.Module, cfg: StructuredConfig, imp: Importance) -> dict:
    """Cut ``model`` in place to the sizes ``cfg`` asks for, by the importances ``imp``; returns the report."""
    flags = check_supported(model)
    s = sizes_of(model)
    t = target_sizes(cfg, s, flags)
    before = non_embedding_params(s, **flags)
    report: dict = {"before": vars(s).copy(), "after": vars(t).copy()}
    if t.intermediate < s.intermediate:
        for layer, score in zip(model.model.layers, imp.mlp, strict=True):
            prune_mlp(layer, keep_top(score, t.intermediate))
    if t.kv_heads < s.kv_heads:
        kept = []
        for layer, score in zip(model.model.layers, imp.groups, strict=True):
            g = keep_top(score, t.kv_heads)
            prune_groups(layer, g, s)
            kept.append(g.tolist())
        report["kept_groups"] = kept
    eps = None
    if t.hidden < s.hidden:
        eps = prune_hidden(model, keep_top(imp.hidden, t.hidden))
    if t.layers < s.layers:
        keep = keep_top(imp.block_influence, t.layers).tolist()
        drop_layers(model, keep)
        report["kept_layers"] = keep
        report["removed_layers"] = [i for i in range(s.layers) if i not in keep]
        report["block_influence"] = [round(float(x), 5) for x in imp.block_influence]
    set_config(model, t, eps)
    after = non_embedding_params(t, **flags)
    report.update(
        non_embedding_params_before=before,
        non_embedding_params_after=after,
        non_embedding_fraction=round(after / before, 4),
        params_after=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        calibration_tokens=imp.tokens,
    )
    return report
