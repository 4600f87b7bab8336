"""llama.cpp backend (``llama-cpp-python``): score token windows and time generation on a GGUF file.

Logits come from llama.cpp's own kernels (its quantized matmuls, its F16 KV cache by default), so the
numbers are what a llama.cpp user gets. Ids are fed as given, never re-tokenized; the KV cache is
cleared before every window. Timing uses llama.cpp's perf counters (``llama_perf_context``).

Memory. A window is decoded in batches of ``n_batch`` positions, each asking llama.cpp for the logits of
all its positions and copied out before the next (:meth:`LlamaCppBackend.logit_blocks`): llama.cpp's
output buffer holds one batch (``n_batch`` × vocabulary floats, at most :data:`OUTPUT_BYTES`: 512 rows up
to a 65,536-token vocabulary, 128 for Gemma's 262,144), never the window.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llmopt.backends.base import Backend, SpeedResult, block_rows, resolve_threads
from llmopt.errors import LLMOptError

log = logging.getLogger(__name__)

_MIN_CTX = 512  # first context size; grown (context rebuilt) when a longer window arrives
_MAX_BATCH = 512  # positions per llama_decode call (llama.cpp's default n_batch)
OUTPUT_BYTES = 128 << 20  # llama.cpp's logits buffer for one batch: n_batch x n_vocab float32
KV_TYPES = {"f16": 1, "f32": 0}  # KV cache formats → ggml type ids (GGML_TYPE_F16, GGML_TYPE_F32)
# Backends still open at exit are closed while llama_cpp's module globals still exist (its __del__
# would otherwise print a traceback during interpreter shutdown).
_OPEN: weakref.WeakSet[LlamaCppBackend] = weakref.WeakSet()
atexit.register(lambda: [b.close() for b in list(_OPEN)])


def gguf_file_of(spec: str) -> Path:
    """The .gguf file a spec names (a path or ``bundled:<name>``); LLMOptError otherwise."""
    from llmopt.models import BUNDLED_PREFIX, bundled_gguf_path

    if spec.startswith(BUNDLED_PREFIX):
        return Path(bundled_gguf_path(spec[len(BUNDLED_PREFIX) :]))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LLMOptError(f"no such GGUF file: {spec} (the gguf backend needs a .gguf; see `llmopt export`)")
    return path


class LlamaCppBackend(Backend):
    name = "gguf"

    def __init__(
        self, path: str | Path, model_spec: str = "", threads: int | None = None, n_ctx: int = 0, kv_type: str = "f16"
    ):
        """``kv_type``: the KV cache's number format, llama.cpp's default ``f16`` or ``f32`` (an F32 export
        then computes in F32 end to end, within float32 rounding of torch's logits)."""
        from llmopt.models import read_gguf

        if kv_type not in KV_TYPES:
            raise LLMOptError(f"unknown KV cache type '{kv_type}'; valid: {', '.join(KV_TYPES)}")
        self.kv_type = kv_type

        self.path = Path(path)
        self.model_spec = model_spec or str(path)
        reader = read_gguf(self.path)  # header and tensor extents: one-line LLMOptError when corrupt
        arch = reader.fields["general.architecture"].contents()
        field = reader.fields.get(f"{arch}.context_length")
        self.n_ctx_train = int(field.contents()) if field is not None else 0
        self._dtype = _file_type(reader)
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        self._batch_rows = min(_MAX_BATCH, max(32, block_rows(len(tokens.data) if tokens else 0, OUTPUT_BYTES)))
        del reader
        self._threads = resolve_threads(threads)  # None → physical cores, the torch backend's default too
        self._n_ctx = 0
        self.llm = None
        self._load(max(n_ctx, _MIN_CTX))

    @classmethod
    def from_spec(
        cls, spec: str, threads: int | None = None, n_ctx: int = 0, kv_type: str = "f16", **kw
    ) -> LlamaCppBackend:
        if kw.get("device") not in (None, "cpu"):
            raise LLMOptError("the gguf backend runs on the CPU here; drop --device or use --backend torch")
        return cls(gguf_file_of(spec), spec, threads=threads, n_ctx=n_ctx, kv_type=kv_type)

    def _load(self, n_ctx: int) -> None:
        from llmopt.backends.llamacpp_probe import open_llama

        self.close()
        try:
            self.llm = open_llama(
                self.path,
                n_ctx=n_ctx,
                n_batch=min(n_ctx, self._batch_rows),
                logits_all=False,  # llama-cpp-python's own (n_ctx, V) score array is not used
                type_k=KV_TYPES[self.kv_type],
                type_v=KV_TYPES[self.kv_type],
                n_threads=self._threads,
                n_threads_batch=self._threads,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:  # "Failed to load model from file: ..."
            raise LLMOptError(
                f"llama.cpp cannot load {self.path} ({str(e).splitlines()[0][:120]}): "
                "is it a complete GGUF of a supported architecture?"
            ) from e
        self.extra_buffers = bool(self.llm.model_params.use_extra_bufts)  # off where AMX kernels crash
        self.buffers = getattr(self.llm, "llmopt_buffers", "extra")  # extra / repack / plain (llamacpp_probe)
        self._n_ctx = n_ctx
        _OPEN.add(self)

    def _ensure_ctx(self, n_tokens: int) -> None:
        if n_tokens > self._n_ctx:
            size = self._n_ctx
            while size < n_tokens:
                size *= 2
            log.debug("growing the llama.cpp context from %d to %d", self._n_ctx, size)
            self._load(size)

    def _clear(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    @property
    def vocab_size(self) -> int:
        return int(self.llm.n_vocab())

    @property
    def threads(self) -> int:
        return self._threads

    @threads.setter
    def threads(self, n: int) -> None:
        import llama_cpp

        self._threads = resolve_threads(n)
        llama_cpp.llama_set_n_threads(self.llm.ctx, self._threads, self._threads)

    @property
    def dtype(self) -> str:
        """'gguf' and the file's ``general.file_type``, e.g. 'gguf Q4_1' (tensors may mix types)."""
        return self._dtype

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(self.logit_blocks(ids)))  # (L, V)

    def logit_blocks(self, ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """ids (L,) from an empty KV cache, ``n_batch`` positions per ``llama_decode``, each with the logits
        of all its positions (what ``Llama.eval`` with ``logits_all`` does), copied out as (n, V) float32."""
        tokens = ids.reshape(-1).tolist()
        self._ensure_ctx(len(tokens))
        self._clear()
        llm, vocab = self.llm, self.vocab_size
        for i in range(0, len(tokens), llm.n_batch):
            chunk = tokens[i : i + llm.n_batch]
            llm._batch.set_batch(chunk, n_past=i, logits_all=True)
            llm._ctx.decode(llm._batch)
            rows = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk), vocab))
            yield torch.from_numpy(rows.copy())  # (n, V): the buffer is reused by the next decode

    def _decode(self, tokens: list[int], n_past: int) -> int:
        """Decode ``tokens`` at positions n_past.. with logits for the last one only; return its argmax."""
        import llama_cpp

        llm = self.llm
        for i in range(0, len(tokens), llm.n_batch):
            chunk = tokens[i : i + llm.n_batch]
            llm._batch.set_batch(chunk, n_past=n_past + i, logits_all=False)
            llm._ctx.decode(llm._batch)
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.vocab_size,))))

    def greedy(self, ids: list[int], max_new: int) -> Iterator[int]:
        """Incremental greedy decoding on llama.cpp's KV cache: prefill ``ids`` once (logits of the last
        position only), then yield up to ``max_new`` tokens, each the argmax after decoding the one before.

        The cache is cleared first and the context grown to ``len(ids) + max_new`` when needed; stop
        iterating at any time (the next :meth:`logits` or :meth:`greedy` call clears the cache again)."""
        self._ensure_ctx(len(ids) + max_new)
        self._clear()
        nxt = self._decode(list(ids), 0)
        for step in range(max_new):
            yield nxt
            nxt = self._decode([nxt], len(ids) + step)

    def time_generation(self, prompt: torch.Tensor, new_tokens: int) -> SpeedResult:
        """Prefill ``prompt`` (P,) (logits of the last position only), then ``new_tokens`` greedy steps.

        Throughputs come from llama.cpp's counters, read after the prefill and after the decode:
        prompt batches (t_p_eval_ms, n_p_eval) and one-token steps (t_eval_ms, n_eval).
        """
        import llama_cpp

        tokens = prompt.reshape(-1).tolist()
        self._ensure_ctx(len(tokens) + new_tokens)
        self._clear()
        ctx = self.llm.ctx
        llama_cpp.llama_perf_context_reset(ctx)
        nxt = self._decode(tokens, 0)
        pre = llama_cpp.llama_perf_context(ctx)  # a 1-token prompt counts as an eval step, hence the sums
        for step in range(new_tokens):
            nxt = self._decode([nxt], len(tokens) + step)
        perf = llama_cpp.llama_perf_context(ctx)
        self._clear()
        return SpeedResult(
            prefill_tok_s=_rate(pre.n_p_eval + pre.n_eval, pre.t_p_eval_ms + pre.t_eval_ms),
            decode_tok_s=_rate(perf.n_eval - pre.n_eval, perf.t_eval_ms - pre.t_eval_ms),
            prompt_tokens=len(tokens),
            new_tokens=new_tokens,
            threads=self._threads,
            dtype=self._dtype,
        )

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def _file_type(reader) -> str:
    """'gguf <type>' from the header's ``general.file_type`` (e.g. 'gguf Q4_1'), or 'gguf' without one."""
    field = reader.fields.get("general.file_type")
    if field is None:
        return "gguf"
    value = int(field.contents())
    try:
        from gguf import LlamaFileType

        name = LlamaFileType(value).name
    except (ImportError, ValueError):
        return f"gguf file_type {value}"
    for prefix in ("MOSTLY_", "ALL_"):
        name = name.removeprefix(prefix)
    return f"gguf {name}"


def _rate(n: int, ms: float) -> float:
    return n / (ms / 1000) if ms > 0 else float("nan")
