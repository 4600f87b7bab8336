"""The bottom layer: the types every stage, the calibration engine and the saver share.

* :mod:`llmopt.core.config` — the strict pydantic base of recipe entries and the stage-config base;
* :mod:`llmopt.core.state` — calibration statistics, a stage's outcome per Linear, compact quantized codes,
  the compression state handed from stage to stage, the run context of whole-model stages;
* :mod:`llmopt.core.stage` — the stage interface the engine calls.

Nothing here imports the engine, the stages, the registry or the recipe parser (ARCHITECTURE.md)."""
