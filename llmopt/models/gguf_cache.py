"""GGUF → Hugging Face folder, once: dequantized by transformers into
``${LLMOPT_CACHE:-~/.cache/llmopt}/gguf/<name>-<key>`` (float32 safetensors, config, the llama.cpp-exact
tokenizer), atomically (:func:`llmopt.atomic.atomic_write`: temp folder, fsync, rename), keyed by path,
size, mtime and the cache format."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import llmopt.hf_imports  # noqa: F401  (transformers' import-time settings, before its model classes)

# isort: split
from transformers import AutoModelForCausalLM

from llmopt import atomic
from llmopt.errors import LLMOptError, first_line
from llmopt.models.gguf_file import _gguf_value, read_gguf
from llmopt.models.gguf_tokenizer import _build_gguf_tokenizer

log = logging.getLogger(__name__)

# Bump when the layout or content of converted GGUF folders changes: old cache entries are then ignored.
# 2: SentencePiece GGUFs get a llama.cpp-exact tokenizer.json and no tokenizer.model (a copy of the GGUF).
_CACHE_FORMAT = 2
_PROVENANCE_FILE = "llmopt_gguf.json"
_STALE_TMP_S = 6 * 3600  # temp folders older than this are leftovers of a crashed conversion


def _cache_key(gguf: Path) -> str:
    st = gguf.stat()
    ident = f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{_CACHE_FORMAT}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _cache_folder(gguf: Path, root: Path) -> Path:
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in gguf.stem)[:80]
    return root / "gguf" / f"{stem}-{_cache_key(gguf)}"


def _is_complete(folder: Path) -> bool:
    # Folders appear only through os.replace of a finished temp folder; the provenance file is written last.
    return (folder / _PROVENANCE_FILE).is_file()


def _converted_gguf_folder(gguf: Path, root: Path) -> Path:
    """The cached HF folder for ``gguf``, converting it first if needed (atomic: temp folder + rename)."""
    target = _cache_folder(gguf, root)
    if _is_complete(target):
        log.debug("using cached conversion %s of %s", target, gguf)
        return target
    reader = read_gguf(gguf)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LLMOptError(f"cannot create llmopt's cache {target.parent} ({e.strerror}): set LLMOPT_CACHE") from None
    _remove_stale_tmp(target.parent)
    step = "start"
    try:
        # also removes the temp folders of conversions killed mid-way; overwrite=False: a concurrent
        # conversion that finished first keeps its folder
        with atomic.atomic_write(target, kind="folder", overwrite=False) as tmp:
            step = "convert"
            _convert_gguf(gguf, reader, tmp)
            step = "commit"
    except OSError as e:
        if step == "start":
            raise LLMOptError(
                f"cannot write to llmopt's cache {target.parent} ({e.strerror}): set LLMOPT_CACHE"
            ) from None
        if step == "convert" or not _is_complete(target):  # not a concurrent conversion that finished first
            raise
        log.info("another process converted %s meanwhile; using its folder", gguf)
    return target


def _remove_stale_tmp(parent: Path) -> None:
    """Temp folders of older llmopt versions (``.tmp-*``, named without a pid)."""
    now = time.time()
    for p in parent.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(gguf: Path, reader: Any, out: Path) -> None:
    """Dequantize ``gguf`` with transformers into ``out`` (float32 safetensors + config + tokenizer)."""
    arch = _gguf_value(reader, "general.architecture")
    log.info("converting %s (%s) to a Hugging Face folder (once, tens of seconds)", gguf, arch)
    t0 = time.perf_counter()
    tokenizer = _build_gguf_tokenizer(gguf, reader)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - e.g. "GGUF model with architecture X is not supported yet."
        raise LLMOptError(
            f"transformers cannot dequantize {gguf.name} ({arch}): {first_line(e)}; pass a HF folder instead"
        ) from e
    cfg = model.config
    for name in ("bos", "eos", "pad"):  # the GGUF's special ids, as llama.cpp uses them
        tid = _gguf_value(reader, f"tokenizer.ggml.{name}_token_id")
        if tid is not None:
            setattr(cfg, f"{name}_token_id", int(tid))
            setattr(model.generation_config, f"{name}_token_id", int(tid))
    model.save_pretrained(out, safe_serialization=True)
    del model
    tokenizer.save_pretrained(out)
    provenance = {
        "gguf_path": str(gguf),
        "gguf_size": gguf.stat().st_size,
        "gguf_mtime_ns": gguf.stat().st_mtime_ns,
        "architecture": arch,
        "general.name": _gguf_value(reader, "general.name"),
        "tokenizer.ggml.model": _gguf_value(reader, "tokenizer.ggml.model"),
        "tokenizer.ggml.pre": _gguf_value(reader, "tokenizer.ggml.pre"),
        "add_bos_token": bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False)),
        "cache_format": _CACHE_FORMAT,
        "transformers_version": _transformers_version(),
        "created_unix": int(time.time()),
    }
    (out / _PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("converted %s in %.0f s", gguf.name, time.perf_counter() - t0)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
