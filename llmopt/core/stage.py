"""The stage interface: a thin adapter between a recipe entry and a pure kernel.

A stage never walks the model or runs forwards itself. It answers three questions:

* which statistic its kernel needs from calibration data (``statistic``): none, the Hessian
  ``H = 2/N Σ xᵀx`` (SparseGPT, GPTQ), or the per-column ``Σ x_j²`` (Wanda);
* whether a given Linear is acceptable (``check``, run on every target before any work starts);
* what to do with one Linear's weight given that statistic (``compress_linear``).

The calibration engine (:mod:`llmopt.calibration`) or, for data-free stages, :func:`llmopt.compression.compress`
calls it once per target Linear.

A *whole-model* stage (``whole_model = True``: distillation) is not layer-wise: it runs on the whole
model at its place in the recipe, after the stages before it. It may check its inputs before any model
is loaded (``check_inputs``), look at the uncompressed model before any stage runs (``prepare``: e.g.
cache a teacher's logits), do its work (``run_model``), and clean up once the output is saved
(``finish``); a :class:`~llmopt.core.state.RunContext` tells it where the run comes from and goes.
"""

from __future__ import annotations

import fnmatch
from typing import ClassVar, Literal

import torch
from torch import nn

from llmopt.core.config import StageConfig
from llmopt.core.state import CompressionState, LinearOutcome, LinearStats, RunContext
from llmopt.errors import LLMOptError
from llmopt.linears import is_linear

Statistic = Literal["none", "hessian", "act_sq_norm"]


class Stage:
    """Base class; subclasses set ``name``, ``Config`` and ``statistic`` and implement ``compress_linear``."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    statistic: ClassVar[Statistic] = "none"
    whole_model: ClassVar[bool] = False  # runs on the whole model (run_model), not per Linear

    def __init__(self, cfg: StageConfig, index: int = 0):
        self.cfg = cfg
        self.index = index

    def matches(self, name: str) -> bool:
        hit = any(fnmatch.fnmatchcase(name, p) for p in self.cfg.targets)
        return hit and not any(fnmatch.fnmatchcase(name, p) for p in self.cfg.ignore)

    def targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Target modules: nn.Linear and transformers Conv1D (see :mod:`llmopt.linears`) whose names match."""
        found = [(n, m) for n, m in model.named_modules() if is_linear(m) and self.matches(n)]
        if not found:
            raise LLMOptError(
                f"stage '{self.name}' matches no Linear (targets={self.cfg.targets}, "
                f"ignore={self.cfg.ignore}); fix the patterns (fnmatch on module names such as "
                "model.layers.0.mlp.down_proj)"
            )
        return found

    @property
    def needs_calibration(self) -> bool:
        """The kernel itself needs a statistic, so the stage runs inside the calibration engine."""
        return self.statistic != "none"

    @property
    def needs_fp_inputs(self) -> bool:
        """The statistic also needs each Linear's inputs in the uncompressed model (GPTAQ's ΔX X̃ᵀ): the engine
        then carries the uncompressed activations beside the compressed ones."""
        return False

    @property
    def needs_data(self) -> bool:
        """Calibration windows are needed: for the kernel, or to plan OWL layer sparsities."""
        return self.needs_calibration or getattr(self.cfg, "owl", None) is not None

    @property
    def quantizes_head(self) -> bool:
        """The stage also compresses the model's output head (on a tied model the token embedding, the same
        tensor) once every decoder layer is done, with the statistic of the head's input, the final normed
        hidden states: the engine then calls ``compress_linear`` with the head's name and layer index None."""
        return False

    def first_token_weight(self, name: str) -> float:
        """Weight of each calibration window's first token in Linear ``name``'s statistic, as a fraction of the
        window's token count (0 = the plain statistic: the first token counts as any other)."""
        return 0.0

    def check(self, name: str, linear: nn.Linear) -> None:
        """Raise LLMOptError when this Linear cannot be handled (width, group size, N:M)."""

    def compress_linear(
        self, name: str, W: torch.Tensor, stats: LinearStats, state: CompressionState, layer_index: int | None
    ) -> LinearOutcome:
        raise NotImplementedError

    def compress_uncalibrated(
        self, name: str, W: torch.Tensor, state: CompressionState, layer_index: int | None
    ) -> LinearOutcome:
        """A data-driven stage's answer for a target that never ran on the calibration windows (an
        unrouted MoE expert, a branch the data never took): the data-free kernel of the same kind."""
        raise LLMOptError(f"{name} never ran on the calibration data and stage '{self.name}' has no data-free fallback")

    # --- whole-model stages ----------------------------------------------------------------------
    def check_inputs(self, ctx: RunContext) -> None:
        """Before any model is loaded: raise LLMOptError for inputs the stage cannot use."""

    def prepare(self, model: nn.Module, ctx: RunContext) -> None:
        """Before the first stage runs, on the uncompressed model."""

    def run_model(self, model: nn.Module, state: CompressionState, ctx: RunContext) -> dict:
        """Do the stage's work on the whole model; returns its report."""
        raise NotImplementedError

    def finish(self, ctx: RunContext) -> None:
        """After the output was saved."""


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' → (2, 4): N pruned in every M consecutive input weights; None/'unstructured' → None."""
    if pattern is None or pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'N:M' such as '2:4' or 'unstructured', got '{pattern}'") from None
    if not 1 <= n < m:
        raise ValueError(f"pattern N:M needs 1 <= N < M, got {pattern}")
    return n, m
