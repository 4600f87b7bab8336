"""Export a model spec to a llama.cpp GGUF file (gguf-py's ``GGUFWriter``).

Three ways to fill the tensors, chosen by ``type``:

``auto``
    On an llmopt output folder (``quantization.json`` + ``quantization.safetensors``), every quantized
    Linear is written from its stored codes and scales (:mod:`.codes`): GGUF block formats as they are,
    int formats as the GGUF type with the same arithmetic (symmetric int4 in groups of 32k is q4_0, ...),
    each checked bit for bit; an int format no GGUF type holds exactly is refused, never widened to F32. An
    output head a stage quantized (``head``) is written from its codes too: ``output``, or ``token_embd``
    when tied (the same tensor).
    When most Linears are in one llama.cpp block format, every other 2-D tensor (token embedding, output
    head, Linears without codes) gets the type llama.cpp's quantizer picks for that file type
    (:mod:`.auto_types`, :mod:`llmopt.core.llama_types`: for SmolLM2 q4_0 the tied embedding in Q8_0, where llama.cpp's
    Q4_0 writes it too), converted by llama.cpp's quantizer when the writer cannot produce it (Q6_K, ...);
    else F16 (BF16 when saved in bfloat16). ``embedding_type`` / ``output_type`` override the token
    embedding / output head; 1-D norms and biases are F32.
``f32`` / ``f16``
    Plain floats (1-D tensors always F32).
a llama.cpp type (``q4_0``, ``q4_k_m``, ``q6_k``, ...)
    An F32 GGUF is written to a temporary file and llama.cpp's own quantizer (:mod:`.quantize`) converts
    it, optionally guided by an importance matrix (:mod:`.imatrix`).

Architectures (:mod:`.hparams`): llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3 (text), gpt2, laid
out as llama.cpp's ``convert_hf_to_gguf.py`` does (:mod:`.tensors`); the tokenizer with the pre-tokenizer
under which llama.cpp splits text like the HF tokenizer (:mod:`.vocab`). Unsupported architectures and
settings llama.cpp would silently compute differently are refused from the config, before loading weights.

Modules: ``plan`` (types), ``hparams`` (architectures, metadata), ``tensors`` (names, layouts),
``codes`` (stored codes → exact blocks), ``auto_types`` (llama.cpp's type per tensor,
:mod:`llmopt.core.llama_types`, as ``auto`` uses it), ``vocab`` (tokenizer), ``writer`` (file, report),
``quantize`` (llama.cpp quantizer), ``imatrix`` (importance matrix).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from llmopt.checkpoint import check_tokenizer_files
from llmopt.errors import LLMOptError
from llmopt.exporters.gguf.auto_types import Deferred
from llmopt.exporters.gguf.codes import precheck, read_index
from llmopt.exporters.gguf.hparams import SUPPORTED, ArchSpec, check_config
from llmopt.exporters.gguf.imatrix import compute_imatrix, load_imatrix, read_imatrix_file
from llmopt.exporters.gguf.plan import F32_PLAN, GGUF_TYPES, LLAMA_FTYPES, NEED_IMATRIX, make_plan
from llmopt.exporters.gguf.quantize import llama_quantize, llama_retype
from llmopt.exporters.gguf.stream import load_streamed, stream_folder
from llmopt.exporters.gguf.tensors import permute_qk, unpermute_qk
from llmopt.exporters.gguf.vocab import CHECK_TEXT
from llmopt.exporters.gguf.writer import summary, write_gguf
from llmopt.exporters.source import local_folder
from llmopt.outputs import atomic_output, preflight

log = logging.getLogger(__name__)

__all__ = [
    "CHECK_TEXT",
    "GGUF_TYPES",
    "LLAMA_FTYPES",
    "SUPPORTED",
    "compute_imatrix",
    "export_gguf",
    "permute_qk",
    "read_imatrix_file",
    "unpermute_qk",
]


def export_gguf(
    model_spec: str,
    output: str,
    type: str = "auto",  # noqa: A002 - mirrors the CLI flag
    embedding_type: str | None = None,
    output_type: str | None = None,
    overwrite: bool = False,
    imatrix: str | None = None,
    imatrix_samples: int = 32,
    imatrix_seq_len: int = 512,
    imatrix_seed: int = 0,
    threads: int | None = None,
    low_memory: bool | None = None,
) -> dict:
    """Write ``model_spec`` as a GGUF file at ``output``; returns a small report.

    Args:
        model_spec: any spec :func:`llmopt.models.load_model` accepts (an llmopt output folder for
            ``type="auto"`` to write quantized Linears from their codes).
        type: ``auto``, ``f32``, ``f16`` or a llama.cpp quantization type (``q4_0``, ``q4_k_m``, ...).
        embedding_type / output_type: GGML type of the token embedding / separate output head.
        imatrix: only with a llama.cpp type: an imatrix file (llama.cpp GGUF ``*.in_sum2``/``*.counts``
            or legacy ``.dat``) or a calibration data spec (``text:PATH``, ``wikitext2``, ``self:N``) to
            compute mean x² per input column of every decoder Linear on ``imatrix_samples`` windows
            of ``imatrix_seq_len`` tokens, sampled with ``imatrix_seed`` (as a recipe's calibration windows).
        low_memory: write tensor by tensor from the safetensors shards, never holding the model (:mod:`.stream`);
            None: when its float32 size exceeds half the available memory; False: load it whole.
    Returns:
        {"output", "type", "architecture", "file_bytes", "tensor_types" {type: count}, "bits_per_weight"
        (all tensors), "linear_bits_per_weight" (2-D tensors but embeddings and head), "pre_tokenizer",
        "imatrix_entries", "seconds"}.
    The file is written to a temporary sibling ``.NAME.tmp-<pid>`` and renamed on success; on failure or
    interruption nothing is left (:mod:`llmopt.outputs`).
    """
    t0 = time.perf_counter()
    plan = make_plan(type, embedding_type, output_type)
    if imatrix is not None and plan.mode != "llama":
        raise LLMOptError(
            f"--imatrix only applies when llama.cpp quantizes (--type q4_0, q4_k_m, ...), not with --type {type}"
        )
    if plan.dense in NEED_IMATRIX and imatrix is None:
        raise LLMOptError(f"llama.cpp needs an importance matrix for {plan.dense}: pass --imatrix DATA")
    out = preflight(output, overwrite=overwrite, kind="file", suffix=".gguf")
    imatrix_file = None
    if imatrix is not None and Path(imatrix).expanduser().is_file():
        imatrix_file = read_imatrix_file(Path(imatrix).expanduser())  # a corrupt file fails before loading
    folder = local_folder(model_spec)
    if folder is not None:  # everything decidable without the weights, before loading them
        _check_config(folder)
        check_tokenizer_files(folder)
        if plan.mode == "auto":
            precheck(read_index(folder))

    from llmopt.models import load_model

    imatrix_from_data = imatrix is not None and imatrix_file is None
    streamed = stream_folder(model_spec, low_memory, imatrix_from_data)
    read = None
    if streamed is not None:  # a meta skeleton; each tensor read from its shard when written
        loaded, read = load_streamed(streamed, model_spec)
    else:  # float32 holds every saved dtype exactly (a bfloat16 folder keeps its quantized Linears in float32)
        loaded = load_model(model_spec, dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    spec = check_config(model.config)
    if output_type and (spec.tied_only or getattr(model.config, "tie_word_embeddings", False)):
        log.warning("--output-type %s ignored: the embeddings are tied, there is no output tensor", output_type)
    with atomic_output(out, overwrite=overwrite, kind="file") as tmp:
        tmp_f32 = tmp.with_name(tmp.name + ".f32")  # removed with tmp
        imatrix_data = None
        if imatrix is not None:
            imatrix_data = load_imatrix(
                imatrix,
                model,
                tokenizer,
                spec.arch,
                imatrix_samples,
                imatrix_seq_len,
                data=imatrix_file,
                seed=imatrix_seed,
            )
        deferred = Deferred()
        if plan.mode == "llama":  # llama.cpp quantizes from an all-F32 file
            pre = write_gguf(tmp_f32, loaded, spec, F32_PLAN, read=read)
        else:
            pre = write_gguf(tmp, loaded, spec, plan, deferred, read=read)
        del model, tokenizer, loaded  # free the torch weights before llama.cpp loads the F32 file
        if plan.mode == "llama":
            llama_quantize(tmp_f32, tmp, plan, imatrix_data, threads)
        elif deferred.types:  # --type auto: llama.cpp converts what the writer cannot (Q6_K, ...)
            mixed = tmp.with_name(tmp.name + ".mixed")  # removed with tmp
            tmp.rename(mixed)
            llama_retype(mixed, tmp, deferred.ftype, deferred.types, threads)
            mixed.unlink()
        report = summary(tmp)
    report = {
        "output": str(out),
        "type": type,
        "architecture": spec.name,
        **report,
        "pre_tokenizer": pre,
        "imatrix_entries": len(imatrix_data) if imatrix_data else 0,
        **({"low_memory": True} if streamed is not None else {}),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("wrote %s (%.1f MiB, %.3f bits/weight)", out, report["file_bytes"] / 2**20, report["bits_per_weight"])
    return report


def _check_config(folder: Path) -> ArchSpec:
    """:func:`check_config` on ``folder/config.json`` (the model type first: unknown ones may not parse)."""
    from transformers import AutoConfig

    from llmopt.checkpoint import read_config
    from llmopt.exporters.gguf.hparams import arch_of

    raw: dict[str, Any] = read_config(folder)
    arch_of(raw.get("model_type"))
    try:
        cfg = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError):  # load_model words it
        return arch_of(raw.get("model_type"))
    return check_config(cfg)
