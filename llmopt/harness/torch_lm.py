"""lm-eval's own ``HFLM`` wrapping a model and tokenizer llmopt already loaded.

:func:`llmopt.models.load_model` resolves the spec (Hub id, local folder, GGUF file dequantized once,
``bundled:smollm2``) and, for a GGUF, builds the tokenizer from the file's metadata so that it gives
llama.cpp's ids: transformers' own GGUF tokenizer adds a BOS that llama.cpp does not add (SmolLM2's
``add_bos_token`` is false). HFLM is handed that tokenizer with ``add_bos_token=None``: the tokenizer's
own rule decides BOS, the rule llmopt's llama.cpp and ONNX LMs follow too (and the one the GGUF exporter
writes into ``tokenizer.ggml.add_bos_token``). HFLM prepends its prefix token (BOS, else EOS) to an empty
context and to the first window of a rolling log-likelihood on top of that.
"""

from __future__ import annotations

import torch

from llmopt.backends.base import resolve_threads
from llmopt.models import LoadedModel


def torch_lm(loaded: LoadedModel, *, batch_size: int = 1, max_length: int | None = None, threads: int | None = None):
    """An ``HFLM`` over ``loaded`` (its model stays where it is; ``batch_size`` sequences per forward,
    right-padded as HFLM does)."""
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(resolve_threads(threads))
    return HFLM(
        pretrained=loaded.model,
        tokenizer=loaded.tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        add_bos_token=None,
    )
