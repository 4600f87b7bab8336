"""Loading a local Hugging Face folder with every way it can be broken turned into one line.

Before transformers sees the folder: ``config.json`` must be a JSON object whose size fields are
positive integers; every ``*.safetensors`` header must parse, describe tensors whose byte ranges match
their shapes, and end inside the file (a truncated, empty or bit-flipped file is caught here, before
minutes of loading); a shard index must name existing shards; some tokenizer file must exist; a
``generation_config.json`` must parse, hold values generate() accepts and pass transformers' save check.
While loading: a tensor the checkpoint lacks (transformers would silently fill it with random values),
a tensor whose shape disagrees with the config, a tokenizer with more tokens than the embedding has
rows, and NaN/inf weights are errors.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

from llmopt.errors import LLMOptError, first_line, read_json
from llmopt.safetensors_io import INDEX_FILE

log = logging.getLogger(__name__)

CODES_FILE = "quantization.safetensors"  # llmopt's stored codes, not model weights
#: config fields that must be positive integers when present (llama-like, gpt2, opt, MoE names)
INT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "head_dim", "n_embd", "n_layer", "n_head", "n_positions",
    "n_inner", "ffn_dim", "word_embed_proj_dim", "num_local_experts", "num_experts_per_tok",
)  # fmt: skip
FLOAT_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "initializer_range")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tokenizer.tiktoken")
GENERATION_CONFIG = "generation_config.json"
#: generation_config.json sampling numbers and the values generate() accepts (transformers checks them only then)
_GENERATION_NUMBERS = {
    "temperature": lambda v: v > 0,
    "top_p": lambda v: 0 <= v <= 1,
    "min_p": lambda v: 0 <= v <= 1,
    "typical_p": lambda v: 0 < v <= 1,
    "repetition_penalty": lambda v: v > 0,
    "top_k": lambda v: v >= 0 and v == int(v),
}


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` as a dict, its size fields type-checked."""
    raw = read_json(folder / "config.json", "config")
    if not isinstance(raw, dict):
        raise LLMOptError(f"{folder / 'config.json'} is not a JSON object: re-create it (model.config.save_pretrained)")
    configs = [("", raw)] + [(k + ".", v) for k, v in raw.items() if k.endswith("_config") and isinstance(v, dict)]
    for prefix, cfg in configs:
        for key in INT_FIELDS:
            v = cfg.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise LLMOptError(f"config.json of {folder}: '{prefix}{key}' must be a positive integer, got {v!r}")
        for key in FLOAT_FIELDS:
            v = cfg.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise LLMOptError(f"config.json of {folder}: '{prefix}{key}' must be a number, got {v!r}")
    return raw


#: safetensors' own reasons (SafetensorError "Error while deserializing header: ...") in llmopt's words
_SAFETENSORS_REASONS = {
    "header too small": "only {size} bytes",
    "invalid header length": "its header is longer than the file of {size} bytes: truncated or corrupt",
    "header too large": "its header is over 100 MB: corrupt",
    "incomplete metadata, file not fully covered": (
        "truncated or extended: its tensors do not end where the file of {size} bytes ends"
    ),
}


def check_generation_config(folder: Path) -> None:
    """``generation_config.json``, when present, must be a JSON object that transformers can save again.

    transformers replaces a file it cannot parse with defaults derived from config.json (the folder's
    sampling settings silently lost), keeps values generate() refuses later, and refuses to save a
    config with inconsistent flags (``validate(strict=True)``): all of that is one line here, up front.
    """
    path = folder / GENERATION_CONFIG
    if not path.exists():
        return
    hint = "fix or delete it (transformers then derives one from config.json)"
    raw = read_json(path, "generation config")
    if not isinstance(raw, dict):
        raise LLMOptError(f"{path} is not a JSON object: {hint}")
    for key, ok in _GENERATION_NUMBERS.items():
        v = raw.get(key)
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if v is not None and not (number and ok(v)):
            raise LLMOptError(f"{path}: '{key}' is {v!r}, a value generate() refuses: {hint}")
    from transformers import GenerationConfig

    try:
        with _quiet_transformers():  # its constructor logs the issues that validate(strict=True) raises
            GenerationConfig.from_dict(dict(raw)).validate(strict=True)
    except Exception as e:  # noqa: BLE001 - ValueError for bad flags, TypeError for values of the wrong type
        why = " ".join(x.strip() for x in str(e).splitlines() if x.strip() and not x.startswith("If you"))
        why = why.removeprefix("GenerationConfig is invalid:").strip()
        raise LLMOptError(f"{path} is invalid ({why[:240] or type(e).__name__}): {hint}") from None


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name → (dtype, shape) from a safetensors header (``safetensors.safe_open``, which checks
    that the header parses and that its tensors' byte ranges match their shapes and cover the file)."""
    from safetensors import SafetensorError, safe_open

    def corrupt(why: str) -> LLMOptError:
        return LLMOptError(f"{path} is not a valid safetensors file ({why}): re-download or re-save the model")

    try:
        size = path.stat().st_size
        if size == 0:
            raise corrupt("empty")
        out = {}
        with safe_open(str(path), framework="pt") as f:  # the header only: no tensor data is read
            for name in f.offset_keys():
                s = f.get_slice(name)
                out[name] = (s.get_dtype(), tuple(s.get_shape()))
        return out
    except SafetensorError as e:
        why = first_line(e).removeprefix("Error while deserializing header: ")
        raise corrupt(_SAFETENSORS_REASONS[why].format(size=size) if why in _SAFETENSORS_REASONS else why) from None
    except OSError as e:
        raise LLMOptError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None


def check_weights(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every model tensor of the folder's safetensors files (headers only), shards checked."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != CODES_FILE)
    index = folder / INDEX_FILE
    if index.is_file():
        raw = read_json(index, "shard index")
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise LLMOptError(f"{index} has no weight_map: re-save the model")
        missing = sorted({str(s) for s in weight_map.values()} - {p.name for p in files})
        if missing:
            raise LLMOptError(f"{folder} lacks shard(s) {', '.join(missing[:3])} named in {INDEX_FILE}: re-download it")
    if not files:
        raise LLMOptError(f"{folder} has no *.safetensors weights: pass a complete Hugging Face model folder")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for p in files:
        tensors.update(safetensors_header(p))
    if not tensors:
        raise LLMOptError(f"the safetensors files of {folder} hold no tensors: re-save the model")
    return tensors


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' multi-line loading warnings off: llmopt reports what matters in one line."""
    from transformers.utils import logging as tf_logging

    level = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)


def _names(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_causal_lm(folder: Path, *, dtype: Any, trust_remote_code: bool) -> Any:
    """``AutoModelForCausalLM.from_pretrained(folder)`` with the checks of the module docstring."""

    import llmopt.hf_imports  # noqa: F401  (transformers' import-time settings, before its model classes)

    # isort: split
    from transformers import AutoConfig, AutoModelForCausalLM

    read_config(folder)
    tensors = check_weights(folder)
    check_generation_config(folder)
    try:
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise LLMOptError(f"config.json of {folder} cannot be read: {first_line(e, 200)}") from e
    with _quiet_transformers():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                folder,
                config=cfg,
                dtype=dtype,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
        except LLMOptError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken folder surfaces as any exception type
            raise LLMOptError(
                f"could not load a causal LM from {folder}: {type(e).__name__}: {first_line(e, 200)}"
            ) from e
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key = mismatched[0]
        got = tensors.get(key, (None, "?"))[1]
        want = model.state_dict()[key].shape if key in model.state_dict() else "?"
        raise LLMOptError(
            f"config.json of {folder} does not match its weights: {key} is {list(got)} in the checkpoint but "
            f"{list(want)} by the config ({len(mismatched)} tensor(s) differ)"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise LLMOptError(
            f"the checkpoint in {folder} lacks {len(missing)} tensor(s) the model needs ({_names(missing)}); "
            "transformers would fill them with random values: re-download or re-save the model"
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        log.warning("ignored %d checkpoint tensor(s) the model does not use: %s", len(unexpected), _names(unexpected))
    check_finite(model, folder, tensors)
    return model.eval()


def check_finite(model: Any, folder: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """No NaN / infinite weight, without making the model resident.

    transformers leaves parameters stored in the loading dtype as views of the memory-mapped
    safetensors files: their pages are read from disk only when used. Testing those parameters would
    read every page through the model's own mapping and keep it resident (+4 bytes/parameter of RSS
    from the start, ~0.5 GiB on the embedded model, for weights a layer-wise run reaches only later).
    So the stored tensors are tested in chunks of rows of at most 16 MiB, each read through a mapping of
    its own (``safetensors.safe_open``, opened per chunk and closed after it: the pages stay in the OS
    cache, not in this process), and only parameters whose dtype differs from the stored one (converted
    copies, already resident; a float32 → float16 cast can overflow) are tested in the model."""
    import torch
    from safetensors import safe_open

    def bad(name: str) -> LLMOptError:
        return LLMOptError(f"{name} in {folder} holds NaN or infinite values: the checkpoint is corrupt")

    stored_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    params = dict(model.named_parameters())
    on_file = {n for n, p in params.items() if n in tensors and stored_dtype.get(tensors[n][0]) == p.dtype}
    with torch.no_grad():
        for name, p in params.items():
            if p.is_floating_point() and name not in on_file and not bool(torch.isfinite(p).all()):
                raise bad(name)
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == CODES_FILE:
            continue
        for key, (dtype, shape) in safetensors_header(f).items():
            if key not in on_file or stored_dtype.get(dtype) != params[key].dtype:
                continue
            row_bytes = math.prod(shape[1:]) * params[key].element_size()
            step = max(1, (16 << 20) // max(1, row_bytes))
            for a in range(0, shape[0], step) if shape else [None]:
                with safe_open(str(f), framework="pt") as st:
                    part = st.get_tensor(key) if a is None else st.get_slice(key)[a : a + step]
                    finite = bool(torch.isfinite(part).all())
                    del part
                if not finite:
                    raise bad(key)


_TOKENIZER_HINT = "save the tokenizer next to the model with tokenizer.save_pretrained"
_MAX_SPM_BYTES = 256 << 20  # real SentencePiece models are a few MiB (Gemma 3's 262k pieces: 4.5 MiB)


def check_tokenizer_files(folder: Path) -> None:
    """Every tokenizer file of ``folder`` must be readable: JSON files parse, SentencePiece models
    (``tokenizer.model``, ``spiece.model``) parse as SentencePiece. Cheap (no tokenizer is built), so
    callers run it before loading weights; the error names the file."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        files = "tokenizer.json, tokenizer.model or vocab.json"
        raise LLMOptError(f"{folder} has no tokenizer ({files}): {_TOKENIZER_HINT}")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            read_json(folder / name, "tokenizer file")
    for name in ("tokenizer.model", "spiece.model"):
        if (folder / name).is_file():
            _check_sentencepiece(folder / name)


def _check_sentencepiece(path: Path) -> None:
    try:
        import sentencepiece
    except ImportError:  # transformers then reports what it needs
        return
    fix = "re-create it or delete it"
    if (path.parent / "tokenizer.json").is_file():
        fix = "delete it (the folder's tokenizer.json is the tokenizer)"
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
            if head == b"GGUF":  # what transformers' GGUF tokenizer conversion saves as tokenizer.model
                raise LLMOptError(f"{path} is a copy of a GGUF file, not a SentencePiece model: {fix}")
            if path.stat().st_size > _MAX_SPM_BYTES:
                raise LLMOptError(f"{path} is not a SentencePiece model ({path.stat().st_size >> 20} MiB): {fix}")
            data = head + fh.read()
    except OSError as e:
        raise LLMOptError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    try:
        sentencepiece.SentencePieceProcessor().LoadFromSerializedProto(data)
    except Exception:  # noqa: BLE001 - sentencepiece raises RuntimeError / OSError / TypeError
        raise LLMOptError(f"{path} is not a SentencePiece model (its ModelProto does not parse): {fix}") from None


def load_tokenizer(folder: Path, *, trust_remote_code: bool) -> Any:
    """``AutoTokenizer.from_pretrained(folder)``; a missing or corrupt tokenizer is one line."""
    from transformers import AutoTokenizer

    hint = _TOKENIZER_HINT
    check_tokenizer_files(folder)
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - tokenizers/sentencepiece/protobuf raise anything
        raise LLMOptError(f"could not load a tokenizer from {folder}: {first_line(e, 160)} ({hint})") from e


def check_vocab(model: Any, tokenizer: Any, where: str) -> None:
    """The tokenizer must not produce ids beyond the model's embedding rows."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise LLMOptError(
            f"the tokenizer of {where} has {len(tokenizer)} tokens but the model's embedding only {rows} rows: "
            "tokenizer and weights do not belong together"
        )
