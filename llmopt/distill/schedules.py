"""Schedules of the training loop, as functions of the budget fraction used so far.

``progress`` ∈ [0, 1] is the larger of tokens / ``max_tokens`` and minutes / ``max_minutes``, so a run
stopped by the clock still warms up, decays and reaches its gradual-sparsity target. With a token
budget alone it depends on the step only (reruns and resumed runs follow the same schedule).
"""

from __future__ import annotations

import math


def progress(tokens: int, max_tokens: int, minutes: float, max_minutes: float | None) -> float:
    p = tokens / max_tokens
    if max_minutes is not None:
        p = max(p, minutes / max_minutes)
    return min(1.0, p)


def lr_factor(p: float, warmup: float, decay: str, min_ratio: float) -> float:
    """Linear warm-up over the first ``warmup`` of the budget, then cosine / linear decay to
    ``min_ratio`` at the end (or constant)."""
    if warmup > 0 and p < warmup:
        return p / warmup
    if decay == "constant":
        return 1.0
    t = min(1.0, (p - warmup) / (1.0 - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * t)) if decay == "cosine" else 1.0 - t
    return min_ratio + (1.0 - min_ratio) * shape


def cubic_sparsity(s_i: float, s_f: float, j: int, n: int) -> float:
    """Zhu & Gupta (2017) Eq. 1 at update j of n: s_f + (s_i − s_f)(1 − j/n)³."""
    return s_f + (s_i - s_f) * (1.0 - j / n) ** 3
