"""The layer-wise calibration engine shared by every data-driven stage.

Data flow (SparseGPT §3 / GPTQ §4 "sequential" processing, IST-DASLab ``llama_sequential``):

1. run the model once over the calibration windows with every decoder layer bypassed (it returns its
   input unchanged, so the pass costs the embeddings alone) and keep, per batch, the first layer's
   input X₀: (B, L, hidden) and, **per layer**, the arguments the model passes to it (rotary position
   embeddings, and the attention mask of that layer's kind: models that mix sliding-window and full
   attention layers, such as Gemma 2/3 or Qwen2 with sliding windows, pass each layer its own mask),
   with the KV cache switched off;
2. for each decoder layer ℓ, for each stage of the recipe:
   a. run the layer on its inputs with forward hooks on the target Linears that accumulate the
      statistic the stage asks for (Hessian 2/N Σ xᵀx, or Σ x_j²); with ``true_sequential`` the
      Linears are calibrated in groups in the order the layer's forward first calls them (Linears
      reading the same tensor, such as q/k/v or gate/up, form one group), so later groups see the
      already compressed earlier ones;
   b. call the stage's kernel once per target Linear and write the new weight in place; a target
      that never ran on the calibration data (an unrouted MoE expert) gets the stage's data-free
      kernel, with a warning and a note in the report;
3. run the compressed layer once more: its outputs become layer ℓ+1's inputs, so the error made so
   far is carried forward, as in the papers.

When a stage asks for it (GPTAQ, ``Stage.needs_fp_inputs``), a second stream carries the same windows
through the layers with their original weights (:class:`~llmopt.calibration.fp_stream.FPStream`): in 2a
each batch first runs through a copy of the layer made before any stage changed it, and the statistics
see each Linear's input in both models (X̃ through the compressed layers, X in the uncompressed model).

Activations stay in the model's dtype, batch by batch; only one layer's activations live at a time.
"Linear" means nn.Linear or transformers' Conv1D (GPT-2), see :mod:`llmopt.linears`. Layers come from
a :class:`LayerSource`: the model in memory, or (``--low-memory``) each layer's weights streamed from the
safetensors shards and written to the output once final (:mod:`~llmopt.calibration.streaming`).

The package, by job: :mod:`~llmopt.calibration.layers` (finding the decoder layers, the layer source),
:mod:`~llmopt.calibration.capture` (step 1), :mod:`~llmopt.calibration.stats` (the statistics of 2a),
:mod:`~llmopt.calibration.fp_stream` (the uncompressed model's stream),
:mod:`~llmopt.calibration.engine` (the loop: true-sequential groups, kernels, layer outputs),
:mod:`~llmopt.calibration.streaming` (the layers streamed from disk, one at a time).
"""

from llmopt.calibration.capture import Batch, capture_layer_inputs
from llmopt.calibration.engine import (
    apply_to_linear,
    call_order_groups,
    iterate_layers,
    layer_statistics,
    run_layerwise,
)
from llmopt.calibration.layers import LayerSource, find_decoder_layers
from llmopt.calibration.stats import StatsAccumulator

__all__ = [
    "Batch",
    "LayerSource",
    "StatsAccumulator",
    "apply_to_linear",
    "call_order_groups",
    "capture_layer_inputs",
    "find_decoder_layers",
    "iterate_layers",
    "layer_statistics",
    "run_layerwise",
]
