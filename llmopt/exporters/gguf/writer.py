"""Assemble one GGUF file (gguf-py's ``GGUFWriter``) and read it back for the report."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llmopt.exporters.gguf.auto_types import Deferred
from llmopt.exporters.gguf.hparams import ArchSpec, write_hparams
from llmopt.exporters.gguf.plan import FILE_TYPE, LLAMA_FTYPES, Plan
from llmopt.exporters.gguf.tensors import is_linear_tensor, iter_tensors
from llmopt.exporters.gguf.vocab import add_tokenizer


def write_gguf(path: Path, loaded: Any, spec: ArchSpec, plan: Plan, deferred: Deferred | None = None, read=None) -> str:
    """Write metadata, tokenizer and tensors of ``loaded`` to ``path``; return the pre-tokenizer name.
    ``deferred`` collects the tensors written F32 for llama.cpp to convert (:func:`.tensors.iter_tensors`).
    ``read``: a streamed model's reader (:mod:`.stream`): its parameters are on meta and each is read when
    written, and the writer spools every converted tensor to a temporary file instead of keeping it."""
    model, cfg = loaded.model, loaded.model.config
    w = gguf.GGUFWriter(path, spec.name, use_temp_file=read is not None)
    w.add_name(model_name(loaded))
    write_hparams(w, spec, cfg)
    pre = add_tokenizer(w, loaded, cfg.vocab_size)
    counts: Counter[gguf.GGMLQuantizationType] = Counter()
    for name, arr, qtype in iter_tensors(model, loaded.path, spec, plan, deferred, read):
        w.add_tensor(name, arr, raw_dtype=qtype if arr.dtype == np.uint8 else None)
        if is_linear_tensor(name, arr.shape):
            counts[qtype] += int(arr.shape[0])
    main_type = counts.most_common(1)[0][0] if counts else gguf.GGMLQuantizationType.F32
    ftype = FILE_TYPE.get(main_type, gguf.LlamaFileType.GUESSED)
    if deferred is not None and deferred.ftype:  # --type auto of a folder with a llama.cpp file type (q4_k_m, ...)
        ftype = gguf.LlamaFileType(LLAMA_FTYPES[deferred.ftype])
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pre


def model_name(loaded: Any) -> str:
    """``general.name``: the source GGUF's or folder's name.

    llama.cpp (``llama-vocab.cpp``) treats a model whose name contains "phi3" / "phi-3" as Phi-3 and looks
    up Phi-3's special tokens by text, aborting when the vocabulary lacks one: such a name is then
    written as "phi_3" instead.
    """
    name = Path(loaded.gguf_path).stem if loaded.gguf_path else Path(loaded.path).name
    low = name.lower()
    if ("phi3" in low or "phi-3" in low) and not set(_PHI3_TOKENS) <= set(loaded.tokenizer.get_vocab()):
        for bad in ("phi3", "phi-3", "Phi3", "Phi-3", "PHI3", "PHI-3"):
            name = name.replace(bad, "phi_3")
    return name


_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def summary(path: Path) -> dict:
    """Per-type tensor counts and bits per weight of a written file."""
    reader = gguf.GGUFReader(path)
    types: Counter[str] = Counter()
    n_all = b_all = n_lin = b_lin = 0
    for t in reader.tensors:
        types[t.tensor_type.name] += 1
        n, b = int(t.n_elements), int(t.n_bytes)
        n_all, b_all = n_all + n, b_all + b
        if is_linear_tensor(t.name, tuple(t.shape)):
            n_lin, b_lin = n_lin + n, b_lin + b
    return {
        "file_bytes": path.stat().st_size,
        "tensor_types": dict(types),
        "bits_per_weight": 8 * b_all / max(1, n_all),
        "linear_bits_per_weight": 8 * b_lin / max(1, n_lin),
    }
