"""Structured pruning to a smaller dense model: importance on calibration data
(:mod:`~llmopt.structured.importance`, kernels in :mod:`llmopt.kernels.structured`), target sizes
(:mod:`~llmopt.structured.plan`), and the cut itself (:mod:`~llmopt.structured.surgery`) on the Llama
layout (:mod:`~llmopt.structured.layout`)."""

from __future__ import annotations

from torch import nn

from llmopt.kernels.structured import keep_top
from llmopt.structured.config import StructuredConfig
from llmopt.structured.depth import greedy_layers
from llmopt.structured.importance import Importance, measure
from llmopt.structured.layout import Sizes, check_supported, non_embedding_params, sizes_of
from llmopt.structured.plan import Cut, target_sizes
from llmopt.structured.surgery import drop_layers, prune_groups, prune_hidden, prune_mlp, set_config

__all__ = ["Cut", "StructuredConfig", "Importance", "measure", "plan_cut", "prune", "target_sizes"]


def plan_cut(model: nn.Module, cfg: StructuredConfig, imp: Importance) -> tuple[Cut, Sizes]:
    """The kept indices for ``cfg``'s target sizes, by the importances ``imp``."""
    s = sizes_of(model)
    t = target_sizes(cfg, s, check_supported(model))
    cut = Cut()
    if t.intermediate < s.intermediate:
        cut.mlp = [keep_top(score, t.intermediate) for score in imp.mlp]
    if t.kv_heads < s.kv_heads:
        cut.groups = [keep_top(score, t.kv_heads) for score in imp.groups]
    if t.hidden < s.hidden:
        cut.hidden = keep_top(imp.hidden, t.hidden)
    if t.layers < s.layers:
        if cfg.depth_ranking == "loss":
            cut.layers_by_loss = t.layers
        else:
            cut.layers = keep_top(imp.block_influence, t.layers).tolist()
    return cut, t


def prune(
    model: nn.Module, cfg: StructuredConfig, imp: Importance, cut: Cut | None = None, progress: bool = True
) -> dict:
    """Cut ``model`` in place to the sizes ``cfg`` asks for, by the importances ``imp`` (or the given
    ``cut`` of :func:`plan_cut`); returns the report. Layers ranked by loss are chosen here, on the model
    with its widths cut, from the windows ``imp`` was measured on, and written into ``cut.layers``."""
    flags = check_supported(model)
    s = sizes_of(model)
    plan, t = plan_cut(model, cfg, imp)
    cut = cut or plan
    before = non_embedding_params(s, **flags)
    report: dict = {"before": vars(s).copy(), "after": vars(t).copy()}
    if cut.mlp is not None:
        for layer, keep in zip(model.model.layers, cut.mlp, strict=True):
            prune_mlp(layer, keep)
    if cut.groups is not None:
        for layer, g in zip(model.model.layers, cut.groups, strict=True):
            prune_groups(layer, g, s)
        report["kept_groups"] = [g.tolist() for g in cut.groups]
    eps = None
    if cut.hidden is not None:
        eps = prune_hidden(model, cut.hidden)
    if cut.layers is None and cut.layers_by_loss is not None:
        if imp.windows is None:
            raise ValueError("ranking layers by loss needs the calibration windows (measure(...) keeps them)")
        cut.layers, losses = greedy_layers(model, imp.windows, cut.layers_by_loss, progress=progress)
        report["depth_losses"] = [round(x, 4) for x in losses]
    if cut.layers is not None:
        report["depth_ranking"] = "loss" if cut.layers_by_loss is not None else "block_influence"
        drop_layers(model, cut.layers)
        report["kept_layers"] = cut.layers
        report["removed_layers"] = [i for i in range(s.layers) if i not in cut.layers]
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
