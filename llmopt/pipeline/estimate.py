"""The duration printed before a run: the recipe's own work, priced with throughputs measured on this
project's 2-core CPU and scaled with the parameter count of the model each step runs on.

One-shot stages and the steps after compression are scaled from the embedded model (SmolLM2-135M; the
quickstart measured 9 min 20 s): a GPTQ/SparseGPT pass over 32 x 512 calibration tokens ~110 s, a GGUF
export ~10 s, an ONNX export ~40 s, the llama.cpp baseline ~60 s, one row's evaluation ~60 s per
8 x 2048 tokens (with the base's KL) and ~35 s of timing. A distill stage costs what it will do
(:mod:`llmopt.distill.budget`): the teacher windows its time budget is planned to train (not
``max_tokens``: never more than its data holds), at the teacher's rate, then its training budget (or
``max_tokens`` at the student's rate, when that comes first). The student is smaller after a structured
stage, and so is every step after it. ``eval/results/estimates.md`` holds each shipped distillation
recipe's estimate beside its measured duration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmopt.errors import LLMOptError
from llmopt.pipeline.options import PipelineOptions, baseline_type, model_parameter_count

REFERENCE_PARAMS = 135e6  # SmolLM2-135M, the model the one-shot constants were measured on
BYTES_PER_TOKEN = 4.4  # UTF-8 bytes per token of an English text (valid.nounk.txt, SmolLM2's tokenizer: 4.37)
DISTILL_OVERHEAD_S = 30.0  # per distill stage at 135M: accelerate set-up, held-out losses before and after,
# the last step past the clock (half a step on average), the final checkpoint, QAT's re-quantization


@dataclass
class Estimate:
    """Expected seconds per part of a run (``start``, ``stages``, ``teacher cache``, ``training``,
    ``export``, ``baseline``, ``evaluation``, ``harness``)."""

    parts: dict[str, float] = field(default_factory=dict)

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds

    @property
    def seconds(self) -> float:
        return sum(self.parts.values())


def text_windows(spec: str, seq_len: int) -> int | None:
    """Windows of ``seq_len`` tokens a ``text:`` data spec holds, from its size in bytes (no tokenizer);
    None for a Hub dataset, c4 or model samples (as many as any budget asks for)."""
    from llmopt.data import parse_data_spec

    try:
        s = parse_data_spec(spec)
        if s.kind != "text":
            return None
        a, b = s.fraction
        return int(Path(s.path).expanduser().stat().st_size * (b - a) / BYTES_PER_TOKEN) // seq_len
    except (LLMOptError, OSError):
        return None


REFERENCE_LAYERS = 30  # SmolLM2-135M's decoder layers: a structured stage's depth cut is priced on its shape
GREEDY_LAYER_S = 0.043  # one decoder layer over the greedy depth ranking's 8 x 256 tokens at 135M (measured)
GREEDY_HEAD_S = 0.96  # the output head and loss over them (49152-token vocabulary): most of the ranking's time
# one epoch of the reconstruction's refinement per 32 x 512 tokens at 135M (minitron-60, bfloat16 with AMX: 4
# epochs over 128 x 512 tokens took ~410 s, eval/results/reconstruct-60.md 683 s vs 275 s of least squares);
# float32 where bfloat16 is not native: ~1.33x (one SmolLM2 layer, one epoch over 32 x 512 tokens on the same
# host, autocast off vs on: 3.6-4.0 s vs 2.7-3.1 s)
REFINE_EPOCH_S = {True: 25.5, False: 34.0}


def structured_seconds(st, scale: float, tokens: float) -> float:
    """A structured stage at ``scale`` x 135M parameters: the importance pass (~30 s per 32 x 512 tokens),
    the greedy depth ranking when layers go (:mod:`llmopt.structured.depth`: (removed) x (left) partial
    forwards, priced on SmolLM2's 30 layers), the reconstruction (~75 s per 32 x 512 tokens) and its refinement."""
    from llmopt.structured.layout import Sizes
    from llmopt.structured.plan import target_sizes

    ref = Sizes(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, layers=REFERENCE_LAYERS)
    seconds = 30 * scale * tokens
    keep = target_sizes(st, ref, {}).layers if st.depth_ranking == "loss" else REFERENCE_LAYERS
    steps = range(keep + 1, REFERENCE_LAYERS + 1)  # layers left before each removal
    seconds += sum(GREEDY_LAYER_S * k * (k + 1) / 2 + GREEDY_HEAD_S * k for k in steps) * scale
    if st.reconstruct:
        import torch

        from llmopt.precision import native_bf16

        seconds += 75 * scale * tokens
        seconds += REFINE_EPOCH_S[native_bf16(torch.device("cpu"))] * scale * tokens * st.refine_epochs
    return seconds


def estimate(n_params: int, recipe, opts: PipelineOptions) -> Estimate:
    """What a run of ``recipe`` on a model of ``n_params`` parameters will take on this machine."""
    from llmopt.distill import budget

    est = Estimate()
    cal = recipe.calibration
    tokens = cal.samples * cal.seq_len / (32 * 512)
    current = float(n_params)  # parameters of the model the next stage runs on
    est.add("start", 30.0)  # start-up, loading (measured ~30 s with the GGUF conversion cached), saving
    for i, st in enumerate(recipe.stages):
        scale = current / REFERENCE_PARAMS
        name = st.stage
        if name in ("gptq", "sparsegpt", "wanda"):
            est.add("stages", 110 * scale * tokens)
        elif name in ("rtn", "magnitude"):
            est.add("stages", 5 * scale)
        elif name == "structured":
            est.add("stages", structured_seconds(st, scale, tokens))
            current = budget.student_params(recipe.stages, i + 1, int(current))
        elif name == "distill":
            student = budget.student_params(recipe.stages, i, n_params)
            teacher = n_params if st.teacher is None else (model_parameter_count(st.teacher) or n_params)
            windows = budget.cache_windows(st, student)
            held = text_windows(st.data or cal.data, st.seq_len)
            if held is not None:
                windows = max(1, min(windows, held - st.heldout_windows))
            windows += st.heldout_windows
            est.add("teacher cache", windows * st.seq_len / budget.teacher_tokens_per_second(teacher))
            est.add("training", budget.train_seconds(st, student) + DISTILL_OVERHEAD_S * student / REFERENCE_PARAMS)
    scale = current / REFERENCE_PARAMS  # the compressed model: what is exported and evaluated
    if opts.export:
        est.add("export", (10 * ("gguf" in opts.export) + 40 * ("onnx" in opts.export)) * scale)
    baseline = bool(opts.eval and opts.baseline and baseline_type(recipe))
    if baseline:  # llama.cpp's own quantization of the input: an importance-matrix pass + quantizer
        est.add("baseline", (40 * tokens + 20) * n_params / REFERENCE_PARAMS)
    if opts.eval:  # per row: scoring (~60 s per 8 x 2048 tokens with the base's KL) + timing (~35 s)
        windows = (opts.eval_windows or 32) * opts.eval_seq_len / (8 * 2048)
        rows = (1 + baseline) * n_params / REFERENCE_PARAMS + (1 + len(opts.export)) * scale  # input, baseline; ours
        est.add("evaluation", rows * (60 * windows + 35 * opts.speed))
    if opts.harness_tasks:
        est.add("harness", (1 + len(opts.export)) * 60 * scale)
    return est


def estimate_seconds(n_params: int, recipe, opts: PipelineOptions) -> float:
    """The expected duration of a run, seconds (:func:`estimate`'s parts summed)."""
    return estimate(n_params, recipe, opts).seconds
