"""PyTorch eager backend (transformers model on CPU or an accelerator)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator

import torch

from llmopt.backends.base import Backend, SpeedResult, block_rows, resolve_threads


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
        self._blocks_ok: bool | None = None  # lm_head by blocks of positions reproduces the logits

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
    def logit_blocks(self, ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """The trunk once over ids (L,), then the output head (Gemma's soft-capping included) on blocks of
        :func:`~llmopt.backends.base.block_rows` positions: (n, V) float32 on the CPU at a time. A window
        that fits one block is one ordinary forward (:meth:`logits`)."""
        n = block_rows(self.vocab_size)
        if ids.numel() <= n or not self._head_by_blocks():
            yield from self.logits(ids).split(n)
            return
        from llmopt.distill.heads import last_hidden, output_head

        h = last_hidden(self.model, ids.view(1, -1).to(self.device))[0]  # (L, H)
        head = output_head(self.model)
        for start in range(0, h.shape[0], n):
            yield head(h[start : start + n]).float().cpu()  # (n, V)

    def _head_by_blocks(self) -> bool:
        """Whether lm_head(last hidden state) gives this model's logits (checked once on 4 tokens); an
        architecture that post-processes them otherwise gets its full logits split instead."""
        if self._blocks_ok is None:
            from llmopt.distill.heads import last_hidden, output_head

            ids = torch.arange(1, 5, device=self.device).view(1, -1) % self.vocab_size
            try:
                want = self.model(input_ids=ids, use_cache=False).logits.float()
                got = output_head(self.model)(last_hidden(self.model, ids)).float()
                scale = float(want.abs().max().clamp_min(1))
                self._blocks_ok = got.shape == want.shape and bool(torch.allclose(got, want, atol=1e-4 * scale))
            except Exception:  # noqa: BLE001 - no base model / output embeddings: the full forward it is
                self._blocks_ok = False
        return self._blocks_ok

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
