"""The user's whole loop after the recipe: exports, evaluation of every artifact, report, card, Hub.

``run.py`` orchestrates (``llmopt compress ... --export --eval --harness --push-to-hub``); ``report.py``
writes and compares run reports (``llmopt report``)."""

from llmopt.pipeline.report import compare, load_report
from llmopt.pipeline.run import PipelineOptions, estimate_seconds, run_pipeline

__all__ = ["PipelineOptions", "compare", "estimate_seconds", "load_report", "run_pipeline"]
