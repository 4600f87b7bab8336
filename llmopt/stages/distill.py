"""The distill stage: a thin adapter from the recipe entry to :mod:`llmopt.distill`.

Not a layer-wise stage: it trains the whole student at its place in the recipe (after the pruning and
quantization stages before it), on a teacher prepared before the first stage ran."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from llmopt.core.stage import Stage
from llmopt.core.state import CompressionState, RunContext
from llmopt.distill.config import DistillConfig
from llmopt.errors import LLMOptError


class DistillStage(Stage):
    name = "distill"
    Config: ClassVar = DistillConfig
    statistic = "none"
    whole_model = True
    cfg: DistillConfig

    def __init__(self, cfg, index: int = 0):
        super().__init__(cfg, index)
        self._prepared = None

    def check_inputs(self, ctx: RunContext) -> None:
        from llmopt.distill.prepare import check_inputs

        check_inputs(self.cfg, ctx, self.index)

    def prepare(self, model: nn.Module, ctx: RunContext) -> None:
        from llmopt.distill.prepare import prepare

        self._prepared = prepare(self.cfg, model, ctx, self.index)

    def run_model(self, model: nn.Module, state: CompressionState, ctx: RunContext) -> dict:
        import torch

        from llmopt import memory
        from llmopt.distill import loop
        from llmopt.distill.curve import curve_files

        if self._prepared is None:
            raise LLMOptError("the distill stage was not prepared: run it through llmopt.compress")
        p = self._prepared
        names = [n for n, _ in self.targets(model)] if self.cfg.gradual is not None else []
        quantized = [n for n in names if n in state.quantized]
        if quantized:
            raise LLMOptError(f"gradual sparsity cannot prune the quantized Linear {quantized[0]}: exclude it (ignore)")
        job = loop.DistillJob(
            cfg=self.cfg,
            data=p.data,
            teacher=p.teacher,
            state=state,
            gradual_targets=names,
            seed=p.seed,
            key=p.key,
            checkpoints=_checkpoints(ctx),
            resume=ctx.resume,
        )
        device = ctx.device if ctx.device is not None else next(model.parameters()).device
        with memory.phase("distill.train"):  # loop.run switches to distill.finish after its last step
            report, linears = loop.run(model, job, torch.device(device))
        report.update(
            teacher_seconds=p.teacher_seconds,
            teacher_windows_computed=p.teacher_windows,
            teacher_windows_cached=p.teacher.ready,
            peak_rss_mib_by_phase=_distill_peaks(),
        )
        for name, entry in linears.items():
            lin = model.get_submodule(name)
            state.reports.append(
                {
                    "stage": self.name,
                    "stage_index": self.index,
                    "linear": name,
                    "shape": list(_shape(lin)),
                    "seconds": 0.0,
                    **entry,
                }
            )
        curve = report.pop("curve")
        title = f"distill: {self.cfg.loss}, T={self.cfg.temperature:g}"
        state.files.update(curve_files(curve, title, report["heldout_kl"]))
        self._prepared = None  # the live teacher, if any, can go
        return report

    def finish(self, ctx: RunContext) -> None:
        from llmopt.distill.resume import remove

        folder = _checkpoints(ctx)
        if folder is not None:
            remove(folder)


def _checkpoints(ctx: RunContext):
    from llmopt.distill.resume import checkpoint_dir

    if ctx.checkpoints is not None:
        return ctx.checkpoints
    return checkpoint_dir(ctx.output) if ctx.output is not None else None


def _distill_peaks() -> dict[str, float]:
    """Peak RSS (MiB) of the phases a distillation goes through, so far: the model's loading, the teacher
    cache, training (student, AdamW state, activations), its extension of the cache, the finish (final
    held-out loss, checkpoint, re-quantization). The folder's save comes after (the run's report)."""
    import logging

    from llmopt.memory import phase_peaks

    names = ("load", "distill.teacher_cache", "distill.train", "distill.teacher_extend", "distill.finish")
    peaks = {n.removeprefix("distill."): v for n, v in phase_peaks().items() if n in names}
    if peaks:
        logging.getLogger(__name__).info("distill peak RSS by phase (MiB): %s", peaks)
    return peaks


def _shape(lin: nn.Module) -> tuple[int, int]:
    from llmopt.linears import in_features, out_features

    return out_features(lin), in_features(lin)
