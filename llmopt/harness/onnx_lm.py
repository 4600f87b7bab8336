"""lm-eval ``LM`` on an ONNX folder (``llmopt export --to onnx``: optimum's ``text-generation-with-past``
graph, the folder ``ORTModelForCausalLM`` loads) through llmopt's ONNX Runtime backend.

Scoring is :class:`~llmopt.backends.onnx_backend.OnnxBackend.logits` (one run from an empty KV cache,
CPU execution provider, the shared thread count) under
:class:`~llmopt.harness.backend_lm.BackendLM`'s HFLM-equivalent token rules; greedy generation feeds the
graph's ``present.*`` outputs back as ``past_key_values``. Tokenizer and ``max_length`` come from the
folder (its tokenizer files and ``config.json``, resolved as HFLM resolves them).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from llmopt.backends.onnx_backend import OnnxBackend
from llmopt.harness.backend_lm import DEFAULT_MAX_LENGTH, BackendLM


class OnnxLM(BackendLM):
    @classmethod
    def from_spec(
        cls,
        spec: str,
        *,
        tokenizer=None,
        threads: int | None = None,
        max_length: int | None = None,
        progress: bool = True,
    ) -> OnnxLM:
        from llmopt.models import load_tokenizer

        engine = OnnxBackend.from_spec(spec, threads=threads)  # one-line error when not an ONNX folder
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
        return cls(engine, tokenizer, max_length or _config_max_length(spec, tokenizer), progress=progress)

    def _greedy(self, ids: list[int], max_new: int) -> Iterator[int]:
        """One run over ``ids``, then one token per step feeding the graph's KV cache back."""
        be: OnnxBackend = self.engine  # type: ignore[assignment]
        return be.greedy(ids, max_new)


def _config_max_length(folder: str, tokenizer) -> int:
    """HFLM's rule (``resolve_max_length``) on the folder's ``config.json``."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(folder).expanduser())
    return resolve_max_length(config, tokenizer, default=DEFAULT_MAX_LENGTH)
