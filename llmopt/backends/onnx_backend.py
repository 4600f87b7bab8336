"""ONNX Runtime backend: an ONNX folder written by ``llmopt export --to onnx`` (or ``optimum-cli export onnx``
with the ``text-generation-with-past`` task), run on the CPU execution provider.

The session is fed directly (no optimum wrapper in the timed loop): ``input_ids``, ``attention_mask``,
``position_ids`` and the ``past_key_values.{i}.key/value`` inputs (length 0 for a fresh sequence), and
``present.{i}.*`` outputs are fed back as the next step's past, so decode reuses the KV cache. Threads:
``intra_op_num_threads`` = the shared thread count, one inter-op thread, sequential execution.

The exported graph computes the logits of every prompt position (optimum's graphs have no
``logits_to_keep``), so prefill includes the output head over the whole prompt, unlike the torch and
llama.cpp backends, which compute the last position only; reported speeds say so in ``dtype``.

Memory. :meth:`OnnxBackend.logit_blocks` (evaluation, the harness) and the prefill of
:meth:`OnnxBackend.greedy` run a long window as consecutive chunks of positions on the KV cache, so at most
one chunk's logits (64 MiB of float32) exist at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llmopt.backends.base import Backend, SpeedResult, block_rows, resolve_threads
from llmopt.errors import LLMOptError

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def is_onnx_folder(spec: str) -> bool:
    """True when ``spec`` is a folder holding ``model.onnx`` (what ``--backend auto`` sends here)."""
    p = Path(spec).expanduser()
    return p.is_dir() and (p / "model.onnx").is_file()


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, folder: str | Path, model_spec: str = "", threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder).expanduser()
        if not is_onnx_folder(str(folder)):
            raise LLMOptError(
                f"{folder} is not an ONNX folder (no model.onnx): export one with llmopt export --to onnx"
            )
        self.model_spec = model_spec or str(folder)
        self._threads = resolve_threads(threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self._threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types; one line for the user
            raise LLMOptError(f"ONNX Runtime cannot load {folder / 'model.onnx'}: {str(e).splitlines()[0]}") from e
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs or "logits" not in [o.name for o in self.session.get_outputs()]:
            raise LLMOptError(f"{folder / 'model.onnx'} is not a causal-LM graph (needs input_ids → logits)")
        self._past = [n for n in inputs if n.startswith("past_key_values.")]
        # past input shape: (batch, kv_heads, past_len, head_dim); symbolic dims are strings
        self._past_spec = {
            n: ([d if isinstance(d, int) else 0 for d in inputs[n].shape], _NP.get(inputs[n].type, np.float32))
            for n in self._past
        }
        self._present = ["present." + n.removeprefix("past_key_values.") for n in self._past]
        self._has_mask = "attention_mask" in inputs
        self._has_pos = "position_ids" in inputs
        cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        rep = folder / "llmopt_onnx.json"
        info = json.loads(rep.read_text()) if rep.is_file() else {}
        self._vocab = int(cfg.get("vocab_size") or self.session.get_outputs()[0].shape[-1])
        quant = info.get("quant", "none")
        level = info.get("accuracy_level")
        self._dtype = (
            "onnx "
            + ("float32" if quant == "none" else quant)
            + (f" acc{level}" if quant.startswith("int4") or quant == "auto" else "")
        )

    @classmethod
    def from_spec(cls, spec: str, threads: int | None = None, **_: object) -> OnnxBackend:
        return cls(spec, spec, threads=threads)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def dtype(self) -> str:
        """'onnx float32', 'onnx int4-rtn acc0', 'onnx auto acc4' (GPTQ codes), ..."""
        return self._dtype

    def _feed(self, ids: np.ndarray, past: dict[str, np.ndarray] | None, past_len: int) -> dict[str, np.ndarray]:
        """Inputs for ids (1, L) after ``past_len`` cached positions."""
        length = ids.shape[1]
        feed: dict[str, np.ndarray] = {"input_ids": ids}
        if self._has_mask:
            feed["attention_mask"] = np.ones((1, past_len + length), dtype=np.int64)
        if self._has_pos:
            feed["position_ids"] = np.arange(past_len, past_len + length, dtype=np.int64)[None, :]
        if past is None:
            for n, (shape, dt) in self._past_spec.items():
                feed[n] = np.zeros((1, shape[1], 0, shape[3]), dtype=dt)
        else:
            feed.update(past)
        return feed

    def _run(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        outs = self.session.run(["logits", *self._present], feed)
        return outs[0], dict(zip(self._past, outs[1:]))

    def forward(
        self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None, past_len: int = 0
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One run of the graph with its KV cache: ids (1, L) int64 after ``past_len`` cached positions
        (``past``: the cache a previous call returned, None for a fresh sequence) → logits (1, L, V) and
        the cache to pass to the next call (the graph's ``present.*`` outputs)."""
        return self._run(self._feed(ids, past, past_len))

    def greedy(self, ids: list[int], max_new: int) -> Iterator[int]:
        """Incremental greedy decoding: ``ids`` prefilled in chunks of :func:`~llmopt.backends.base.block_rows`
        positions (one run when the graph has no KV cache inputs), then yield up to ``max_new`` tokens, each
        the argmax of the last logits row, fed back one at a time with the KV cache (:meth:`forward`)."""
        x = np.array([ids], dtype=np.int64)
        step_rows = block_rows(self.vocab_size) if self._past else max(1, len(ids))
        past = None
        for start in range(0, max(1, len(ids)), step_rows):  # logits: (1, n, V), n <= step_rows
            logits, past = self.forward(np.ascontiguousarray(x[:, start : start + step_rows]), past, start)
        for step in range(max_new):
            nxt = int(logits[0, -1].argmax())
            yield nxt
            logits, past = self.forward(np.array([[nxt]], dtype=np.int64), past, len(ids) + step)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (L,) → logits (L, V) float32, one forward from an empty cache."""
        x = ids.reshape(1, -1).to(torch.int64).numpy()
        out = self.session.run(["logits"], self._feed(x, None, 0))[0]  # (1, L, V)
        return torch.from_numpy(np.ascontiguousarray(out[0], dtype=np.float32))

    def logit_blocks(self, ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """ids (L,) → (n, V) float32 blocks of :func:`~llmopt.backends.base.block_rows` positions, one graph run
        per block fed the previous blocks' KV cache (:meth:`forward`), so ONNX Runtime never allocates the
        (L, V) logits. A window that fits one block, or a graph without ``past_key_values`` inputs, is one
        run split. Chunked runs attend over the cache instead of the whole window at once: the same logits
        up to float rounding."""
        n = block_rows(self.vocab_size)
        if ids.numel() <= n or not self._past:
            yield from self.logits(ids).split(n)
            return
        x = ids.reshape(1, -1).to(torch.int64).numpy()
        past = None
        for start in range(0, x.shape[1], n):
            out, past = self.forward(np.ascontiguousarray(x[:, start : start + n]), past, start)  # (1, n, V)
            yield torch.from_numpy(np.array(out[0], dtype=np.float32))  # a copy: ORT's buffer is let go
            del out

    def time_generation(self, prompt: torch.Tensor, new_tokens: int) -> SpeedResult:
        """One prefill run over ``prompt`` (P,), then ``new_tokens`` greedy one-token runs that feed the
        ``present`` KV tensors back as ``past_key_values``, each timed with ``time.perf_counter``."""
        x = prompt.reshape(1, -1).to(torch.int64).numpy()
        p = x.shape[1]
        t0 = time.perf_counter()
        logits, past = self._run(self._feed(x, None, 0))
        t_prefill = time.perf_counter() - t0
        nxt = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
        t0 = time.perf_counter()
        for i in range(new_tokens):
            logits, past = self._run(self._feed(nxt, past, p + i))
            nxt = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
        t_decode = time.perf_counter() - t0
        return SpeedResult(
            prefill_tok_s=p / t_prefill,
            decode_tok_s=new_tokens / t_decode if new_tokens > 0 else float("nan"),
            prompt_tokens=p,
            new_tokens=new_tokens,
            threads=self._threads,
            dtype=self.dtype,
        )

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
