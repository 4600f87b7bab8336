"""lm-eval ``LM`` on a GGUF file, in process, through llama-cpp-python (llmopt's llama.cpp backend).

lm-eval 0.4.13's own ``gguf`` model posts to a llama.cpp server's ``/v1/completions`` with ``echo`` and
``logprobs``, a protocol current llama.cpp servers no longer answer. Here the requests are scored by
:class:`~llmopt.backends.llamacpp_backend.LlamaCppBackend` (a logit row for every token, in batches of
``n_batch`` positions consumed one at a time, llama.cpp's own kernels, its F16 KV cache unless
``kv_type="f32"``, the cache cleared before every sequence), with
:class:`~llmopt.harness.backend_lm.BackendLM`'s HFLM-equivalent token rules.

Token ids come from :func:`llmopt.models.load_tokenizer` on the GGUF (llama.cpp's ids exactly, BOS only
where the file's ``tokenizer.ggml.add_bos_token`` says so) and are fed as ids, never re-tokenized by
llama.cpp. ``max_length`` defaults to the file's ``context_length`` (HFLM: ``max_position_embeddings``,
which the GGUF exporter writes there).

KV cache. llama.cpp's default F16 cache moves each token's log-probability by ~1e-4 on the tiny test
model, so a document's sum over hundreds of tokens drifts past 1e-3 from torch's; ``kv_type="f32"``
(``--kv-cache f32``) makes an F32 export compute in F32 end to end, for fidelity checks against torch.
"""

from __future__ import annotations

from collections.abc import Iterator

from llmopt.backends.llamacpp_backend import LlamaCppBackend
from llmopt.harness.backend_lm import DEFAULT_MAX_LENGTH, BackendLM


class LlamaCppLM(BackendLM):
    @classmethod
    def from_spec(
        cls,
        spec: str,
        *,
        tokenizer=None,
        threads: int | None = None,
        max_length: int | None = None,
        kv_type: str = "f16",
        progress: bool = True,
    ) -> LlamaCppLM:
        from llmopt.models import load_tokenizer

        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
        engine = LlamaCppBackend.from_spec(spec, threads=threads, kv_type=kv_type)
        return cls(engine, tokenizer, max_length or engine.n_ctx_train or DEFAULT_MAX_LENGTH, progress=progress)

    def _greedy(self, ids: list[int], max_new: int) -> Iterator[int]:
        """Prefill ``ids`` once, then one token per step on llama.cpp's KV cache (argmax of the last row)."""
        be: LlamaCppBackend = self.engine  # type: ignore[assignment]
        return be.greedy(ids, max_new)
