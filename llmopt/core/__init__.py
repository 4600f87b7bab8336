"""The bottom layer: the types every stage, the calibration engine and the saver share.

* :mod:`llmopt.core.config` — the strict pydantic base of recipe entries and the stage-config base;
* :mod:`llmopt.core.state` — calibration statistics, a stage's outcome per Linear, compact quantized codes,
  the compression state handed from stage to stage, the run context of whole-model stages;
* :mod:`llmopt.core.stage` — the stage interface the engine calls;
* :mod:`llmopt.core.llama_types` — the ggml type llama.cpp's quantizer gives each tensor of a file type (its
  ``llama_tensor_get_type``, pure): the GGUF exporter's ``--type auto`` and the quantization stage's
  ``head: auto`` read the same rule;
* :mod:`llmopt.core.llama_mix` — that rule on an HF model: each Linear's GGUF name, and its type and llmopt
  format in a llama.cpp file type (``format: q4_k_m``), for the quantization stages, the exporter and the
  pipeline's checks.

Nothing here imports the engine, the stages, the registry or the recipe parser (ARCHITECTURE.md)."""
