"""The base of every recipe entry: strict pydantic models (unknown keys are errors naming the valid ones)
and the fields every stage has. Each algorithm's config subclasses :class:`StageConfig` once, next to its
stage adapter or its package (``llmopt.stages.*``, ``llmopt.distill.config``, ``llmopt.structured.config``),
and that one validated object is what its kernel receives."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageConfig(StrictModel):
    """Fields every stage has: which nn.Linear modules it touches (fnmatch patterns on module names)."""

    stage: str
    targets: list[str] = ["*"]
    ignore: list[str] = ["lm_head"]
