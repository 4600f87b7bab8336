"""Shared pieces of the one-shot pruning kernels (magnitude, Wanda, SparseGPT, OWL).

Conventions, used by every pruning kernel:

* ``W`` is an ``nn.Linear`` weight, (out, in); scores have the same shape.
* Masks are bool (out, in) with **True = weight kept**.
* ``n_m = (N, M)`` means N weights *pruned* in every group of M consecutive input columns of each row
  (2:4 = 50 %), as ``prunen/prunem`` in the SparseGPT reference code. When ``n_m`` is given it
  replaces ``sparsity``.
* Unstructured sparsity is exact per layer: a layer ends with exactly ``round(sparsity · numel)``
  pruned weights (Python's ``round``). Kernels that select per row or per block split that total
  with :func:`cumulative_quotas`, so every part gets its share up to ±1 and the parts add up.
* Ties between equal scores are broken deterministically: the lower (flattened) index is pruned
  first (stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.errors import LLMOptError


@dataclass(frozen=True)
class PruneResult:
    """Output of a pruning kernel.

    weight: (out, in) float32, pruned entries exactly 0.
    mask:   (out, in) bool, True = kept; ``weight[~mask] == 0``.
    loss:   the kernel's reconstruction error (see each kernel for what it measures).
    """

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float


def validate_sparsity(sparsity: float, n_m: tuple[int, int] | None, in_features: int, name: str = "") -> None:
    """Raise :class:`LLMOptError` (one line, says what to do) for an unusable sparsity or N:M pattern."""
    where = f" for {name}" if name else ""
    if not 0.0 <= sparsity < 1.0:  # also rejects NaN
        hint = " (1.0 would prune every weight)" if sparsity >= 1.0 else ""
        raise LLMOptError(f"sparsity{where} is {sparsity}{hint}; use a value in [0, 1), e.g. 0.5")
    if n_m is None:
        return
    n, m = n_m
    if not (1 <= n < m):
        raise LLMOptError(
            f"N:M pattern {n}:{m}{where} is invalid; N (weights pruned per group) must satisfy 1 <= N < M, e.g. 2:4"
        )
    if in_features % m:
        raise LLMOptError(
            f"N:M group size M={m} does not divide the input width {in_features}{where}; "
            "choose an M that divides it or prune this layer unstructured"
        )


def n_pruned(sparsity: float, count: int) -> int:
    """Number of weights pruned out of ``count`` at ``sparsity``: round(sparsity · count)."""
    return round(sparsity * count)


def cumulative_quotas(sparsity: float, sizes: list[int]) -> list[int]:
    """Split round(sparsity · Σ sizes) pruned weights over parts of the given sizes.

    Part i gets round(s · (size_0+…+size_i)) − round(s · (size_0+…+size_{i−1})): within 1 of
    s · size_i, never more than size_i, and the quotas telescope to exactly round(s · total).
    """
    quotas, done, prev = [], 0, 0
    for size in sizes:
        done += size
        cur = n_pruned(sparsity, done)
        quotas.append(cur - prev)
        prev = cur
    return quotas


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning exactly the k lowest entries of ``scores`` (any shape), ties by lower index."""
    order = torch.argsort(scores.flatten(), stable=True)  # (numel,)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:k]] = False
    return keep.view(scores.shape)


def layer_threshold_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask with exactly round(sparsity · numel) lowest scores of the whole matrix pruned."""
    return lowest_k_mask(scores, n_pruned(sparsity, scores.numel()))


def row_topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, keep the highest scores: (out, in) bool.

    Row i prunes its q_i lowest scores, q = :func:`cumulative_quotas` over rows: every row prunes
    round(sparsity · in) when that is exact, otherwise floor or ceil of sparsity · in, so that the
    layer total is exactly round(sparsity · numel).
    """
    out, cols = scores.shape
    return row_quota_mask(scores, torch.tensor(cumulative_quotas(sparsity, [cols] * out), device=scores.device))


def row_quota_mask(scores: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Keep-mask pruning the q_i lowest scores of row i: scores (out, in), q (out,) ints; ties by lower index."""
    cols = scores.shape[1]
    order = torch.argsort(scores, dim=1, stable=True)  # (out, in) ascending
    rank_kept = torch.arange(cols, device=scores.device)[None, :] >= q[:, None]  # (out, in) by rank
    return torch.empty_like(rank_kept).scatter_(1, order, rank_kept)


def topup_quotas(already: torch.Tensor, total: int) -> torch.Tensor:
    """Per-row pruned counts t ≥ ``already`` (out,) adding up to max(``total``, Σ already), as even as can be.

    Water-filling: t_i = max(already_i, L) for the largest level L that fits, and the r left over go one
    each to r of the rows at the level, spread as :func:`cumulative_quotas` spreads. Rows already above
    the level keep their count, so rows that start uneven never push the layer past ``total``.
    """
    already = already.to(torch.int64)
    total = max(total, int(already.sum()))  # a pruned weight is never revived
    lo, hi = 0, total  # the level L = lo fits; search (lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if int(already.clamp_min(mid).sum()) <= total else (lo, mid - 1)
    t = already.clamp_min(lo)
    at_level = torch.nonzero(already <= lo).flatten()  # rows where +1 keeps the spread within 1
    r = total - int(t.sum())
    if r > 0:
        extra = cumulative_quotas(r / len(at_level), [1] * len(at_level))
        t[at_level] += torch.tensor(extra, dtype=t.dtype, device=t.device)
    return t


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask pruning the n lowest scores in each group of m consecutive columns of every row.

    scores: (out, in) with in % m == 0. Exactly n zeros per group; ties prune the lower column first.
    """
    out, cols = scores.shape
    groups = scores.reshape(out, cols // m, m)  # (out, in/m, m)
    order = torch.argsort(groups, dim=-1, stable=True)
    rank_kept = (torch.arange(m, device=scores.device) >= n).expand_as(order)
    return torch.empty_like(rank_kept).scatter_(-1, order, rank_kept).reshape(out, cols)


def check_shapes(W: torch.Tensor, vec: torch.Tensor | None = None, H: torch.Tensor | None = None) -> None:
    """Programming-error checks shared by the kernels (ValueError, not a user error)."""
    if W.dim() != 2:
        raise ValueError(f"W must be (out, in), got shape {tuple(W.shape)}")
    cols = W.shape[1]
    if vec is not None and vec.shape != (cols,):
        raise ValueError(f"per-input-channel statistic must be ({cols},), got {tuple(vec.shape)}")
    if H is not None and H.shape != (cols, cols):
        raise ValueError(f"H must be ({cols}, {cols}), got {tuple(H.shape)}")
