"""The backend interface shared by torch, llama.cpp and ONNX Runtime evaluation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpeedResult:
    prefill_tok_s: float  # prompt tokens per second, one forward over the whole prompt
    decode_tok_s: float  # generated tokens per second, greedy, one token per step with a KV cache
    prompt_tokens: int
    new_tokens: int
    threads: int


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

    @abstractmethod
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (L,) int64 → logits (L, V) float32; row t predicts token t+1. No cache between calls."""

    @abstractmethod
    def time_generation(self, prompt: torch.Tensor, new_tokens: int) -> SpeedResult:
        """Prefill ``prompt`` (P,) then greedily decode ``new_tokens``; warm-up is the caller's job."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (files, threads)."""
