"""A GGUF written tensor by tensor from the safetensors shards, for models that do not fit in memory.

The in-memory export loads the whole model in float32 and gguf-py's writer keeps every converted tensor until
it writes the file: about twice the float32 size at the peak. Streamed, the model is a skeleton on the meta
device (:class:`llmopt.models.lazy.LazyModel`: names, shapes, modules, config), each tensor is read from its
shard when the writer reaches it (memory-mapped, cast to float32 exactly as the in-memory load casts it),
converted, and handed to a writer that spools it to a temporary file (``GGUFWriter(use_temp_file=True)``)
before the next one is read. The file is the same byte for byte (tested). Chosen by ``low_memory=True``
(``--low-memory``), or automatically where the model's float32 size exceeds half the available memory;
llama.cpp's own quantizer (``--type q4_k_m`` ...) then works on the streamed F32 file as it always does
(memory-mapped). An importance matrix computed from data runs the whole model, so it is refused streamed
(pass an imatrix file instead).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from llmopt.errors import LLMOptError

log = logging.getLogger(__name__)


def stream_folder(model_spec: str, low_memory: bool | None, imatrix_from_data: bool) -> Path | None:
    """The safetensors folder to stream ``model_spec`` from, or None to load it whole. ``low_memory`` True
    forces streaming (an obstacle is an error), False never streams, None streams when the float32 size
    exceeds :data:`~llmopt.models.lazy.MEMORY_FRACTION` of the available memory (logged)."""
    from llmopt.models import streamable_folder
    from llmopt.models.lazy import MEMORY_FRACTION, oversized_folder

    if low_memory is False:
        return None
    if low_memory:
        if imatrix_from_data:
            raise LLMOptError(
                "--low-memory cannot compute an importance matrix from data (that runs the whole model): pass an "
                "imatrix file (llama.cpp's llama-imatrix writes one) or run without --low-memory"
            )
        return streamable_folder(model_spec)
    big = None if imatrix_from_data else oversized_folder(model_spec)
    if big is None:
        return None
    folder, need, avail = big
    log.info(
        "the model's float32 size (%.0f MiB) exceeds %d%% of the available memory (%.0f MiB): writing the GGUF "
        "tensor by tensor from its shards (--no-low-memory loads it whole)",
        need, round(100 * MEMORY_FRACTION), avail,
    )  # fmt: skip
    return folder


def load_streamed(folder: Path, model_spec: str) -> tuple[object, Callable[[str], torch.Tensor]]:
    """(a LoadedModel whose model is the meta skeleton, a reader: parameter name → its float32 tensor)."""
    from llmopt.models import LoadedModel, gguf_source
    from llmopt.models.lazy import load_lazy

    lazy, tokenizer = load_lazy(folder, model_spec, dtype=torch.float32)

    def read(name: str) -> torch.Tensor:
        stored = lazy.stored_name(name) or name
        if stored not in lazy.ckpt:
            raise LLMOptError(f"internal: {name} is neither a stored tensor nor computed by the model")
        return lazy.ckpt.get(stored, torch.float32)

    loaded = LoadedModel(lazy.model, tokenizer, spec=model_spec, path=str(folder), gguf_path=gguf_source(model_spec))
    return loaded, read
