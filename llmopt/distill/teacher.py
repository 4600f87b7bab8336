"""The teacher: top-k logits cached on disk once, or a live model (full logits, hidden states).

Cache. For every window the teacher's k most likely tokens per position are stored with their logits,
``logsumexp(logits / T)`` and the log of the mass outside them, at the training temperature T and at
T = 1 (the held-out KL), in one safetensors file per window under
``<llmopt cache>/distill-teacher/<teacher fingerprint>-k<k>-T<T>/<window hash>.safetensors`` (the cache
root is ``$LLMOPT_CACHE`` or ``~/.cache/llmopt``). The fingerprint hashes the teacher's weights, so
the default teacher (the input model before compression) and the same model named by its spec share
entries, and any budget, epoch count or rerun reuses every window already there. Files are written to a
temporary name, fsynced and renamed (:func:`llmopt.atomic.atomic_write`): a killed run leaves only
complete entries (and temp files the next fill removes). A position costs k·8 + 16
bytes (k = 64: 270 KB per 512-token window; SmolLM2's full float32 logits would take 100 MB).

Only the training windows the time budget is planned to reach are cached before training
(:mod:`llmopt.distill.budget`); :meth:`Teacher.ensure` caches more when training outruns them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llmopt.atomic import atomic_write, remove_stale_in
from llmopt.distill.heads import last_hidden, layer_outputs, ordered, output_head
from llmopt.kernels.distill import teacher_buckets, topk_summary

log = logging.getLogger(__name__)

#: float32 logits the cache fill summarises at once (positions x vocabulary x 4 bytes): at most
#: ``chunk_tokens`` positions, fewer for a large vocabulary (Gemma 3's 262,144 tokens: 64 positions, not 512)
TOPK_BLOCK_BYTES = 64 << 20

CACHE_FORMAT = 1  # bump when the stored fields change


def model_fingerprint(model: nn.Module) -> str:
    """blake2b of every tensor of the state dict (names, dtypes, shapes, bytes): 16 hex digits."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _window_key(window: torch.Tensor) -> str:
    ids = window.to(torch.int64).contiguous().numpy()
    return hashlib.blake2b(ids.tobytes(), digest_size=12).hexdigest() + f"-{ids.shape[0]}"


@dataclass
class Targets:
    """The teacher's side of one batch, positions flattened: N = B·L (window after window)."""

    index: torch.Tensor | None = None  # (N, k) int64 top-k ids (cached teacher)
    top: torch.Tensor | None = None  # (N, k) float32 their logits
    lse: torch.Tensor | None = None  # (N,) logsumexp(logits / T)
    tail: torch.Tensor | None = None  # (N,) log mass outside the top k at T
    lse1: torch.Tensor | None = None  # the same two at T = 1
    tail1: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (N, V) full logits (live teacher, top_k None)
    hidden: list[torch.Tensor] | None = None  # per decoder layer (B, L, H) (SquareHead)

    def log_probs(self, rows: slice, T: float, at_one: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher log-probabilities of positions ``rows`` at temperature T (or 1): (n, k + 1) buckets
        with their (n, k) token ids, or (n, V) and None for full logits."""
        t = 1.0 if at_one else T
        if self.logits is not None:
            return torch.log_softmax(self.logits[rows].float() / t, dim=-1), None
        lse, tail = (self.lse1, self.tail1) if at_one else (self.lse, self.tail)
        return teacher_buckets(self.top[rows], lse[rows], tail[rows], t), self.index[rows]


class TopKCache:
    """Top-k teacher logits per window on disk (see the module docstring)."""

    def __init__(self, root: Path, fingerprint: str, k: int, T: float):
        self.k, self.T = k, T
        self.dir = Path(root) / "distill-teacher" / f"{fingerprint}-k{k}-T{T:g}-v{CACHE_FORMAT}"

    def path(self, window: torch.Tensor) -> Path:
        return self.dir / f"{_window_key(window)}.safetensors"

    def missing(self, windows: torch.Tensor) -> list[int]:
        return [i for i in range(windows.shape[0]) if not self.path(windows[i]).is_file()]

    @torch.no_grad()
    def fill(self, model: nn.Module, windows: torch.Tensor, chunk_tokens: int = 512) -> int:
        """Run the teacher on every window not cached yet; returns how many were computed.

        The trunk runs once per window; the output head and the top-k summary on blocks of at most
        ``chunk_tokens`` positions and :data:`TOPK_BLOCK_BYTES` of float32 logits (the summary is per
        position, so the block size changes no number beyond float rounding of the head's matmul)."""
        from safetensors.torch import save_file

        todo = self.missing(windows)
        if not todo:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_in(self.dir)  # temp files of runs killed mid-write
        device = next(model.parameters()).device
        head = output_head(model)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        rows = max(1, min(chunk_tokens, TOPK_BLOCK_BYTES // (4 * vocab)))
        for i in tqdm(todo, desc="teacher top-k cache", unit="window"):
            ids = windows[i : i + 1].to(device)
            h = last_hidden(model, ids)[0]  # (L, H)
            parts = []
            for c in range(0, len(h), rows):
                z = head(h[c : c + rows])  # (rows, V)
                top, index, lse, tail = topk_summary(z, self.k, self.T)
                lse1, tail1 = (lse, tail) if self.T == 1.0 else topk_summary(z, self.k, 1.0)[2:]
                parts.append((top, index.to(torch.int32), lse, tail, lse1, tail1))
            names = ("top", "index", "lse", "tail", "lse1", "tail1")
            tensors = {n: torch.cat(x).contiguous().cpu() for n, x in zip(names, zip(*parts))}
            with atomic_write(self.path(windows[i]), clean_stale=False) as tmp:
                save_file(tensors, str(tmp))
        log.info("teacher cache %s: %d windows computed", self.dir, len(todo))
        return len(todo)

    def load(self, windows: torch.Tensor, device: torch.device) -> Targets:
        """Cache entries of windows (B, L), positions flattened window after window."""
        from safetensors.torch import load_file

        entries = [load_file(str(self.path(w))) for w in windows]
        stack = {k: torch.cat([e[k] for e in entries]).to(device) for k in entries[0]}  # (B·L, ...)
        return Targets(
            index=stack["index"].long(),
            top=stack["top"],
            lse=stack["lse"],
            tail=stack["tail"],
            lse1=stack["lse1"],
            tail1=stack["tail1"],
        )


class Teacher:
    """What the loop asks for per batch: cached top-k targets, and/or a live forward (full logits when
    ``top_k`` is None, hidden states for SquareHead).

    ``pool``: the training windows (N, L) in the order the first epoch visits them; the first ``ready``
    are cached (those the time budget is planned to train, :mod:`llmopt.distill.budget`). ``loader``
    gives the teacher model again when training outruns that prefix (:meth:`ensure`); that teacher time
    counts in the loop's ``max_minutes`` clock."""

    def __init__(
        self,
        cache: TopKCache | None,
        model: nn.Module | None,
        want_hidden: bool,
        pool: torch.Tensor | None = None,
        ready: int = 0,
        loader: Callable[[], nn.Module | None] | None = None,
        chunk_tokens: int = 512,
    ):
        self.cache = cache
        self.model = model
        self.want_hidden = want_hidden
        self.pool = pool
        self.ready = ready if pool is not None else 0
        self.loader = loader
        self.chunk_tokens = chunk_tokens
        self.extended = 0  # windows cached during training
        self._dead_end = False  # the teacher could not be had again: train on the cached windows

    def ensure(self, idx: list[int]) -> list[int]:
        """Training window indices ``idx`` with their teacher targets cached: when one lies beyond the
        cached prefix, the teacher (the live one, else ``loader()``) fills the next windows, at least as
        many as are cached already (so a badly planned budget costs a few teacher loads, not one per
        step), and is released again. Without a teacher to run, ``idx`` wrap onto the cached windows
        (logged once): training continues, on windows it has seen."""
        if self.cache is None or self.pool is None or max(idx) < self.ready:
            return idx
        if not self._dead_end:
            self.ready = self._cached_prefix()  # a resumed run, another process
        if max(idx) >= self.ready and not self._dead_end:
            upto = min(len(self.pool), max(max(idx) + 1, 2 * self.ready))
            model = self.model if self.model is not None else (self.loader() if self.loader else None)
            if model is None:
                self._dead_end = True
                log.warning(
                    "training outran the %d cached teacher windows and the teacher cannot be loaded again: "
                    "later steps reuse the cached windows",
                    self.ready,
                )
            else:
                from llmopt import memory

                with memory.phase("distill.teacher_extend"):
                    log.info("training outran the teacher cache: caching windows %d..%d", self.ready, upto)
                    self.extended += self.cache.fill(model, self.pool[self.ready : upto], self.chunk_tokens)
                self.ready = upto
                del model
                memory.release_freed_memory()
        if self._dead_end:
            return [i % max(1, self.ready) for i in idx]
        return idx

    def _cached_prefix(self) -> int:
        n = self.ready
        while n < len(self.pool) and self.cache.path(self.pool[n]).is_file():
            n += 1
        return n

    @torch.no_grad()
    def targets(self, ids: torch.Tensor) -> Targets:
        """ids: (B, L) on the training device."""
        t = self.cache.load(ids.cpu(), ids.device) if self.cache is not None else Targets()
        if self.model is not None and (self.cache is None or self.want_hidden):
            with layer_outputs(self.model, enabled=self.want_hidden) as store:
                h = last_hidden(self.model, ids)
            if self.cache is None:
                t.logits = output_head(self.model)(h.reshape(-1, h.shape[-1]))  # (B·L, V)
            if self.want_hidden:
                t.hidden = ordered(store)
        return t
