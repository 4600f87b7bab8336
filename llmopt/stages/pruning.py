"""Pruning stages: thin adapters from recipe entries to the pruning kernels."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from llmopt.core.config import StageConfig, StrictModel
from llmopt.core.stage import Stage, parse_pattern
from llmopt.core.state import CompressionState, LinearOutcome, LinearStats
from llmopt.kernels.magnitude import magnitude_prune
from llmopt.kernels.pruning import PruneResult, validate_sparsity
from llmopt.kernels.sparsegpt import SparseGPTConfig, sparsegpt_prune
from llmopt.kernels.wanda import wanda_prune
from llmopt.linears import in_features


class OWLConfig(StrictModel):
    """Outlier-weighted layerwise sparsity (Yin et al. 2024): per-decoder-layer ratios, same mean."""

    lam: float = Field(0.08, ge=0.0, lt=1.0)  # λ: sparsities span [s − λ, s + λ]
    m: float = Field(5.0, gt=0.0)  # a score is an outlier above m·mean(score) of its layer


class PruneConfig(StageConfig):
    sparsity: float | None = None  # fraction pruned; implied by pattern N:M when given
    pattern: str = "unstructured"  # or "N:M", e.g. "2:4" = 2 of every 4 consecutive weights pruned
    owl: OWLConfig | None = None

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        parse_pattern(v)
        return v

    @model_validator(mode="after")
    def _sparsity(self):
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} ({implied}); drop one")
            if self.owl is not None:
                raise ValueError("owl (non-uniform layer sparsity) needs unstructured sparsity, not an N:M pattern")
            object.__setattr__(self, "sparsity", implied)
        elif self.sparsity is None:
            raise ValueError("set sparsity (e.g. 0.5) or pattern (e.g. '2:4')")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity} (1.0 would prune every weight)")
        return self


class PruningStage(Stage):
    """Shared by magnitude, Wanda and SparseGPT: sparsity/N:M checks, OWL ratios, mask bookkeeping."""

    cfg: PruneConfig

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_pattern(self.cfg.pattern)

    def check(self, name: str, linear: nn.Module) -> None:
        validate_sparsity(self.cfg.sparsity, self.n_m, in_features(linear), name)

    def sparsity_for(self, state: CompressionState, layer_index: int | None) -> float:
        per_layer = state.layer_sparsity.get(self.index)
        if per_layer is not None and layer_index is not None:
            return per_layer[layer_index]
        return float(self.cfg.sparsity)

    def prune(self, W: torch.Tensor, stats: LinearStats, sparsity: float) -> PruneResult:
        raise NotImplementedError

    def compress_linear(self, name, W, stats, state, layer_index) -> LinearOutcome:
        sparsity = self.sparsity_for(state, layer_index)
        return self._outcome(name, self.prune(W, stats, sparsity), sparsity, state)

    def compress_uncalibrated(self, name, W, state, layer_index) -> LinearOutcome:
        """No activations seen: magnitude pruning at the same sparsity / N:M pattern."""
        sparsity = self.sparsity_for(state, layer_index)
        out = self._outcome(name, magnitude_prune(W, sparsity, self.n_m), sparsity, state)
        out.report["fallback"] = "magnitude"
        return out

    def _outcome(self, name: str, res: PruneResult, sparsity: float, state: CompressionState) -> LinearOutcome:
        previous = state.masks.get(name)
        mask = res.mask if previous is None else (res.mask & previous)
        state.masks[name] = mask
        report = {
            "sparsity": float(1.0 - mask.float().mean()),
            "target_sparsity": sparsity,
            "pattern": self.cfg.pattern,
            "loss": res.loss,
        }
        if self.n_m is not None:
            n, m = self.n_m
            zeros = (~mask).view(mask.shape[0], -1, m).sum(-1)
            report["n_m_exact"] = bool((zeros == n).all())
        return LinearOutcome(weight=res.weight, keep_mask=mask, report=report)


class MagnitudeConfig(PruneConfig):
    stage: Literal["magnitude"]


class MagnitudeStage(PruningStage):
    """Prune the smallest |w| per matrix (or per N:M group). Data-free unless OWL is asked for."""

    name = "magnitude"
    Config: ClassVar = MagnitudeConfig
    statistic = "none"

    def prune(self, W, stats, sparsity):
        return magnitude_prune(W, sparsity, self.n_m)


class WandaConfig(PruneConfig):
    stage: Literal["wanda"]


class WandaStage(PruningStage):
    """|W|·‖X_j‖ scores per output row (Sun et al. 2023)."""

    name = "wanda"
    Config: ClassVar = WandaConfig
    statistic = "act_sq_norm"

    def prune(self, W, stats, sparsity):
        return wanda_prune(W, stats.act_sq_norm, sparsity, self.n_m)


class SparseGPTStageConfig(SparseGPTConfig, PruneConfig):
    """A recipe's ``sparsegpt`` entry: sparsity and targets plus SparseGPT's own
    :class:`~llmopt.kernels.sparsegpt.SparseGPTConfig`, which the kernel receives as it is."""

    stage: Literal["sparsegpt"]


class SparseGPTStage(PruningStage):
    """OBS pruning with weight reconstruction (Frantar & Alistarh 2023)."""

    name = "sparsegpt"
    Config: ClassVar = SparseGPTStageConfig
    statistic = "hessian"

    def prune(self, W, stats, sparsity):
        return sparsegpt_prune(W, stats.hessian, sparsity, self.n_m, self.cfg)
