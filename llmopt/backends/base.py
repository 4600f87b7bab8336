"""The backend interface shared by torch, llama.cpp and ONNX Runtime evaluation."""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llmopt.errors import LLMOptError

#: logits a backend materialises at once when scoring block by block (positions × vocabulary × 4 bytes):
#: a 262,144-token vocabulary (Gemma 3) has 1 GiB of float32 logits per 1024 positions.
LOGIT_BLOCK_BYTES = 64 << 20


def block_rows(vocab_size: int, budget: int = LOGIT_BLOCK_BYTES) -> int:
    """Positions per block of float32 logits that fit ``budget`` bytes (at least 1)."""
    return max(1, budget // (4 * max(1, vocab_size)))


def default_threads() -> int:
    """The thread count every backend uses unless told otherwise: the number of physical cores.

    Hyper-threads share a core's execution units, so matmul-bound inference rarely gains from them
    (llama.cpp and PyTorch both default to physical cores); one number for all backends keeps their
    speeds comparable. Falls back to ``os.cpu_count()`` when psutil cannot tell.
    """
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # psutil missing or unable to read the topology (containers, exotic platforms)
        n = None
    return max(1, int(n or os.cpu_count() or 1))


def resolve_threads(threads: int | None) -> int:
    """``threads`` validated (>= 1), or :func:`default_threads` when None."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise LLMOptError(f"--threads must be a whole number >= 1, got {threads!r}")
    return threads


@dataclass(frozen=True)
class SpeedResult:
    """Throughput of one timed run, or the summary of several (``repeats`` > 1).

    ``prefill_tok_s`` / ``decode_tok_s`` are the medians over the repeats (the single value for one
    run); ``*_min`` / ``*_max`` their spread (equal to the value for one run).
    """

    prefill_tok_s: float  # prompt tokens per second, one forward over the whole prompt (median)
    decode_tok_s: float  # generated tokens per second, greedy, one token per step with a KV cache (median)
    prompt_tokens: int
    new_tokens: int
    threads: int
    prefill_tok_s_min: float = math.nan
    prefill_tok_s_max: float = math.nan
    decode_tok_s_min: float = math.nan
    decode_tok_s_max: float = math.nan
    repeats: int = 1
    dtype: str = ""  # what the weights ran in: "float32", "bfloat16", or "gguf <file type>"

    def __post_init__(self) -> None:
        for name, value in (("prefill_tok_s", self.prefill_tok_s), ("decode_tok_s", self.decode_tok_s)):
            for end in ("_min", "_max"):
                if math.isnan(getattr(self, name + end)):
                    object.__setattr__(self, name + end, value)


class Backend(ABC):
    """One loaded model that can score token windows and time generation."""

    name: str = "abstract"
    model_spec: str = ""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def threads(self) -> int: ...

    @property
    def dtype(self) -> str:
        """The number format the weights run in (reported with speeds); '' when unknown."""
        return ""

    @abstractmethod
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (L,) int64 → logits (L, V) float32; row t predicts token t+1. No cache between calls."""

    def logit_blocks(self, ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """ids: (L,) → the rows of ``logits(ids)`` in order, as consecutive (n, V) float32 blocks.

        Backends that can compute the output head a block of positions at a time override this, so the
        whole (L, V) never exists; this default splits the full logits (memory as ``logits``)."""
        yield from self.logits(ids).split(block_rows(self.vocab_size))

    @abstractmethod
    def time_generation(self, prompt: torch.Tensor, new_tokens: int) -> SpeedResult:
        """Prefill ``prompt`` (P,) then greedily decode ``new_tokens``; warm-up is the caller's job."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (files, threads)."""
