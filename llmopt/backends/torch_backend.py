"""PyTorch eager backend (transformers model on CPU or an accelerator)."""

from __future__ import annotations

import inspect
import time

import torch

from llmopt.backends.base import Backend, SpeedResult, resolve_threads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, model_spec: str = "", threads: int | None = None):
        """``threads`` None → physical cores (:func:`~llmopt.backends.base.default_threads`), like llama.cpp.

        ``torch.set_num_threads`` is process-wide: every torch backend in a process shares one count.
        """
        self.model = model.eval()
        self.model_spec = model_spec
        torch.set_num_threads(resolve_threads(threads))
        param = next(model.parameters())
        self.device = param.device
        self._dtype = str(param.dtype).removeprefix("torch.")
        # Prefill computes the logits of the last position only when the model allows it (as llama.cpp
        # does): the LM head over all P positions is not part of generating the next token.
        self._last_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters

    @classmethod
    def from_spec(cls, spec: str, threads: int | None = None, device: str | None = None) -> TorchBackend:
        from llmopt.models import load_model

        loaded = load_model(spec, device=device)
        return cls(loaded.model, spec, threads=threads)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    @property
    def dtype(self) -> str:
        """The weights' torch dtype without the ``torch.`` prefix, e.g. 'float32' or 'bfloat16'."""
        return self._dtype

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids.view(1, -1).to(self.device), use_cache=False)
        return out.logits[0].float().cpu()  # (L, V)

    @torch.inference_mode()
    def time_generation(self, prompt: torch.Tensor, new_tokens: int) -> SpeedResult:
        """One prefill forward over ``prompt`` (P,), then ``new_tokens`` greedy one-token steps that reuse
        the KV cache (``past_key_values``), each timed with ``time.perf_counter``."""
        ids = prompt.view(1, -1).to(self.device)  # (1, P)
        extra = {"logits_to_keep": 1} if self._last_logits_only else {}
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model(input_ids=ids, use_cache=True, **extra)
        _sync(self.device)
        t_prefill = time.perf_counter() - t0
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)  # nxt: (1, 1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = self.model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        t_decode = time.perf_counter() - t0
        return SpeedResult(
            prefill_tok_s=ids.shape[1] / t_prefill,
            decode_tok_s=new_tokens / t_decode if new_tokens > 0 else float("nan"),
            prompt_tokens=ids.shape[1],
            new_tokens=new_tokens,
            threads=self.threads,
            dtype=self.dtype,
        )
