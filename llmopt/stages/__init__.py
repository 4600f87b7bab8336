"""The one registry of stage names. A recipe's ``stage:`` value resolves here and nowhere else."""

from __future__ import annotations

from llmopt.core.stage import Stage
from llmopt.stages.distill import DistillStage
from llmopt.stages.pruning import MagnitudeStage, SparseGPTStage, WandaStage
from llmopt.stages.quantization import GPTQStage, RTNStage
from llmopt.stages.structured import StructuredStage

REGISTRY: dict[str, type[Stage]] = {
    "magnitude": MagnitudeStage,
    "wanda": WandaStage,
    "sparsegpt": SparseGPTStage,
    "rtn": RTNStage,
    "gptq": GPTQStage,
    "distill": DistillStage,
    "structured": StructuredStage,
}


def build_stages(recipe) -> list[Stage]:
    """Instantiate the stages of a parsed recipe, in order."""
    return [REGISTRY[cfg.stage](cfg, index=i) for i, cfg in enumerate(recipe.stages)]
