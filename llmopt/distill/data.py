"""Distillation windows: a training set and a held-out set of token windows from one data spec.

A text (``text:PATH[#A:B]``, ``wikitext2``'s train split, ``hf:...``) is tokenized once (as calibration
and evaluation are) and cut into non-overlapping windows of ``seq_len`` tokens. The **last**
``heldout`` windows of the text are held out (contiguous, so no held-out window shares a paragraph with
a training window beyond its boundary); the others, in an order drawn from ``random.Random(seed)``, are
the training windows, of which only as many as the token budget can reach are kept (each one costs a
teacher forward in the cache). ``c4`` samples windows inside its train-shard documents and ``self:N``
samples N sequences from the model (the teacher); their last ``heldout`` windows are held out.

:func:`batch_windows` gives the windows of any (step, micro-batch, process) without state, so a resumed
run draws exactly the batches an uninterrupted one would. The first epoch visits the training windows in
the order they were drawn (already random), so the first n steps touch only a prefix of them: the teacher
cache holds the prefix the time budget can train (:mod:`llmopt.distill.budget`). Epoch e ≥ 1 visits them
in the order of ``random.Random(seed + e)``.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch

from llmopt.data import (
    DataSpec,
    c4_documents,
    load_text,
    parse_data_spec,
    sample_document_windows,
    sample_from_model,
    tokenize_text,
)
from llmopt.errors import LLMOptError

log = logging.getLogger(__name__)


@dataclass
class DistillData:
    train: torch.Tensor  # (N_train, L) int64
    heldout: torch.Tensor  # (N_heldout, L) int64
    spec: str


def check_data(spec: str) -> None:
    """Fail fast (one line, before any model is loaded) on data a distillation cannot use."""
    s = parse_data_spec(spec)
    if s.kind == "text":
        load_text(s, role="calib")  # missing or empty file, not UTF-8


def distill_windows(
    spec: str | DataSpec, tokenizer, seq_len: int, heldout: int, seed: int, max_train: int, model=None
) -> DistillData:
    """Training windows (at most ``max_train``) and ``heldout`` held-out windows, both (n, seq_len)."""
    s = parse_data_spec(spec) if isinstance(spec, str) else spec
    if s.kind == "self":
        if model is None:
            raise LLMOptError("self:N distillation data needs the teacher to sample from")
        if s.n_samples <= heldout:
            raise LLMOptError(f"self:{s.n_samples} leaves no training window after {heldout} held-out ones")
        windows = sample_from_model(model, tokenizer, s.n_samples, seq_len, seed)
        train, held = windows[:-heldout], windows[-heldout:]
    elif s.kind == "c4":
        windows = sample_document_windows(c4_documents("calib"), tokenizer, max_train + heldout, seq_len, seed)
        train, held = windows[:-heldout], windows[-heldout:]
    else:
        ids = tokenize_text(tokenizer, load_text(s, role="calib"))  # (T,)
        n = ids.numel() // seq_len
        if n < heldout + 1:
            raise LLMOptError(
                f"distillation data {s} has {ids.numel()} tokens: fewer than {heldout + 1} windows of {seq_len} "
                "(held-out plus one to train on); use more text, a shorter seq_len or fewer heldout_windows"
            )
        windows = ids[: n * seq_len].view(n, seq_len)
        held = windows[n - heldout :]
        order = list(range(n - heldout))
        random.Random(seed).shuffle(order)
        train = windows[order]
    train = train[:max_train].contiguous()
    log.info(
        "distillation data %s: %d training and %d held-out windows of %d tokens", s, len(train), len(held), seq_len
    )
    return DistillData(train=train, heldout=held.contiguous(), spec=str(s))


def windows_needed(max_tokens: int, seq_len: int) -> int:
    """Training windows a budget of ``max_tokens`` can reach in one epoch."""
    return max(1, math.ceil(max_tokens / seq_len))


def batch_windows(
    n_train: int, seed: int, step: int, micro: int, grad_accum: int, batch_size: int, rank: int, world: int
) -> list[int]:
    """Indices into the training windows for one micro-batch of one process.

    The global sample stream is the windows in order, then epoch after epoch of permutations
    (``random.Random(seed + epoch)``); step s, micro-batch m takes ``batch_size · world`` consecutive
    samples of it, process r its slice. Windows at stream position p < n_train: window p."""
    per_micro = batch_size * world
    start = (step * grad_accum + micro) * per_micro + rank * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n_train)
        out.append(i if epoch == 0 else _epoch_order(n_train, seed, epoch)[i])
    return out


_ORDERS: dict[tuple[int, int, int], list[int]] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _ORDERS:
        if len(_ORDERS) > 8:
            _ORDERS.clear()
        order = list(range(n))
        random.Random(seed + epoch).shuffle(order)
        _ORDERS[key] = order
    return _ORDERS[key]
