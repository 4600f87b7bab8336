"""The user's whole loop after the recipe: exports, evaluation of every artifact, report, card, Hub.

``options.py`` holds what happens after the stages and what is checked before any work, ``steps.py`` the
steps (export, baseline, evaluation, harness) and their record, ``run.py`` orchestrates (``llmopt compress
... --export --eval --harness --push-to-hub``); ``report.py`` writes and compares run reports (``llmopt
report``); ``estimate.py`` the duration printed before a run."""

from llmopt.pipeline.estimate import estimate, estimate_seconds
from llmopt.pipeline.options import PipelineOptions
from llmopt.pipeline.report import compare, load_report
from llmopt.pipeline.run import run_pipeline

__all__ = ["PipelineOptions", "compare", "estimate", "estimate_seconds", "load_report", "run_pipeline"]
