"""How much work a distill stage does: the tokens its budget can train and the teacher windows to cache.

The training loop stops at ``max_tokens`` or ``max_minutes``, whichever comes first, so the tokens it
trains are ``min(max_tokens, tokens/s × 60 · max_minutes)``. Caching the teacher's top-k logits for
``max_tokens`` would cost a teacher forward per window that is never trained on (1M tokens = 1953 windows
of 512, ~28 min of teacher on 2 cores, before a 30-minute budget that trains ~250k). So the cache is sized
by what the budget can train, with a margin (:data:`CACHE_MARGIN`); the loop extends it if training runs
faster than planned (:meth:`llmopt.distill.teacher.Teacher.ensure`).

Throughputs scale inversely with the parameter count (a forward and a backward cost ~2N and ~4N
multiply-adds per token, N the parameters the token passes through, the output head included), from
constants measured on this project's 2-core CPU with SmolLM2-135M (134.5M parameters, tied embedding
counted once), alone on the machine:

* training, :data:`TRAIN_PARAM_TOKENS_PER_S`: GPTQ q4_0 + QAT 133 and 150 tokens/s
  (``eval/results/distill-qat*.md``), SparseGPT 2:4 118 tokens/s (``distill-2of4.md``), Minitron 60%
  (81.2M parameters) 213 tokens/s (``structured.md``): 15.9e9 to 20.2e9 tokens·parameters/s, held-out
  evaluations and checkpoints included;
* teacher cache, :data:`TEACHER_PARAM_TOKENS_PER_S`: 235 windows of 512 tokens in 201 s (599 tokens/s,
  windows drawn and weights fingerprinted included; ``distill-qat.json``).

Those were float32 runs; the default settings train ~1.3x faster over a whole run where bfloat16 is native
(:data:`MIXED_PRECISION_SPEEDUP`, ``eval/bench_train_speed.py``).

On another machine (a GPU) the constants are wrong by its speed-up: training then outruns the cache and
the loop extends it, and the printed estimate is this CPU's.
"""

from __future__ import annotations

import math

import torch

from llmopt.distill.config import DistillConfig
from llmopt.distill.precision import resolve_precision

TRAIN_PARAM_TOKENS_PER_S = 17.5e9  # trained tokens/s × student parameters
TEACHER_PARAM_TOKENS_PER_S = 8.0e10  # cached teacher tokens/s × teacher parameters
CHECKPOINTING_SLOWDOWN = 1.33  # gradient checkpointing re-runs each layer's forward (measured ~25% slower)
# the default settings (bf16 autocast where the CPU has AVX512-BF16/AMX, fused head + top-k loss, fake
# quantization once per step) against the float32 settings the constant above was measured with. The steps
# alone run 2.03-2.28x faster (eval/results/train-speed.md, alone on the machine); a whole 30-minute run,
# held-out losses and checkpoints included, trained 512k tokens where the float32 one trained 385k
# (minitron-60, eval/results/structured.md): 1.33x. The whole run is what the budget plans for.
MIXED_PRECISION_SPEEDUP = 1.33
LIVE_TEACHER_SLOWDOWN = 1.33  # a teacher forward (~2N) beside the student's forward + backward (~6N)
CACHE_MARGIN = 1.25  # windows cached beyond the planned ones (the loop extends the cache past them)


def train_tokens_per_second(cfg: DistillConfig, student_params: int) -> float:
    """Trained tokens per second of a student with ``student_params`` parameters on this CPU."""
    rate = TRAIN_PARAM_TOKENS_PER_S / max(1, student_params)
    if resolve_precision(cfg.mixed_precision, torch.device("cpu")) == "bf16" and cfg.fused_loss:
        rate *= MIXED_PRECISION_SPEEDUP
    if cfg.gradient_checkpointing:
        rate /= CHECKPOINTING_SLOWDOWN
    if cfg.live_teacher:
        rate /= LIVE_TEACHER_SLOWDOWN
    return rate


def teacher_tokens_per_second(teacher_params: int) -> float:
    """Teacher tokens per second of the top-k cache fill (forward + top-k summary) on this CPU."""
    return TEACHER_PARAM_TOKENS_PER_S / max(1, teacher_params)


def planned_tokens(cfg: DistillConfig, student_params: int) -> int:
    """Tokens the loop is expected to train: ``max_tokens``, or fewer when ``max_minutes`` ends it first."""
    if cfg.max_minutes is None:
        return cfg.max_tokens
    return int(min(cfg.max_tokens, train_tokens_per_second(cfg, student_params) * 60 * cfg.max_minutes))


def train_seconds(cfg: DistillConfig, student_params: int) -> float:
    """Expected wall clock of the training loop: the budget, or ``max_tokens`` at the expected rate."""
    seconds = cfg.max_tokens / train_tokens_per_second(cfg, student_params)
    return seconds if cfg.max_minutes is None else min(seconds, 60 * cfg.max_minutes)


def cache_windows(cfg: DistillConfig, student_params: int) -> int:
    """Training windows whose teacher logits are cached before training: the planned tokens with the
    margin, never more than ``max_tokens`` can reach (the data may hold fewer)."""
    tokens = cfg.max_tokens
    if cfg.max_minutes is not None:
        tokens = min(tokens, CACHE_MARGIN * planned_tokens(cfg, student_params))
    return max(1, math.ceil(tokens / cfg.seq_len))


def student_params(stages: list, index: int, n_params: int) -> int:
    """Parameters of the student when stage ``index`` runs: the input's, times the kept fraction
    ``params`` of a structured stage before it (other structured sizes are counted as not shrinking)."""
    n = float(n_params)
    for st in stages[:index]:
        if getattr(st, "stage", None) == "structured" and getattr(st, "params", None) is not None:
            n *= st.params
    return int(n)
