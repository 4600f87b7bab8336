"""The structured stage: a thin adapter from the recipe entry to :mod:`llmopt.structured`.

A whole-model stage: one forward pass over the calibration windows scores channels, heads and layers
on the model as the stages before it left it, then the model is cut to a smaller dense one (new config
sizes; decoder layers by default removed one at a time by the loss their removal costs, on the model with
its widths cut); with ``reconstruct`` (the default) every kept Linear is then refitted by least squares to the
uncut model's layer outputs (a copy of the uncut model is held meanwhile). It must come before any
pruning or quantization stage: their masks and codes name Linears of the uncut shapes."""

from __future__ import annotations

import time
from typing import ClassVar

from torch import nn

from llmopt.core.stage import Stage
from llmopt.core.state import CompressionState, RunContext
from llmopt.errors import LLMOptError
from llmopt.structured.config import StructuredConfig


class StructuredStage(Stage):
    name = "structured"
    Config: ClassVar = StructuredConfig
    statistic = "none"
    whole_model = True
    cfg: StructuredConfig

    @property
    def needs_data(self) -> bool:
        return True

    def targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        from llmopt.structured.layout import check_supported

        check_supported(model)  # before any slow work: a one-line error for other architectures
        return []

    def check_inputs(self, ctx: RunContext) -> None:
        earlier = [c.stage for c in (ctx.recipe.stages[: self.index] if ctx.recipe is not None else [])]
        bad = [s for s in earlier if s not in ("structured", "distill")]
        if bad:
            raise LLMOptError(
                f"the structured stage must come before pruning and quantization stages in the recipe "
                f"(stage {self.index + 1} follows {bad[0]}): their masks and codes name the uncut Linears"
            )

    def prepare(self, model: nn.Module, ctx: RunContext) -> None:
        from llmopt.structured.layout import check_supported, sizes_of
        from llmopt.structured.plan import target_sizes

        target_sizes(self.cfg, sizes_of(model), check_supported(model))  # impossible sizes: fail now

    def run_model(self, model: nn.Module, state: CompressionState, ctx: RunContext) -> dict:
        from llmopt.structured import measure, plan_cut, prune
        from llmopt.structured.reconstruct import reconstruct, teacher_copy

        if state.masks or state.quantized:
            raise LLMOptError("the structured stage must come before pruning and quantization stages in the recipe")
        if ctx.windows is None:
            raise LLMOptError("the structured stage ranks channels on calibration data: give --calib")
        batch = ctx.recipe.calibration.batch_size if ctx.recipe is not None else 4
        t0 = time.perf_counter()
        imp = measure(model, ctx.windows, batch_size=batch)
        t1 = time.perf_counter()
        cut, _ = plan_cut(model, self.cfg, imp)
        teacher = teacher_copy(model) if self.cfg.reconstruct else None
        report = prune(model, self.cfg, imp, cut)
        t2 = time.perf_counter()
        report.update(importance_seconds=round(t1 - t0, 2), cut_seconds=round(t2 - t1, 2))
        if teacher is not None:
            rec = reconstruct(
                teacher,
                model,
                cut,
                ctx.windows,
                batch_size=batch,
                damp=self.cfg.damp,
                refine_epochs=self.cfg.refine_epochs,
                refine_lr=self.cfg.refine_lr,
            )
            report["reconstruction"] = rec | {"seconds": round(time.perf_counter() - t2, 2)}
        return report
