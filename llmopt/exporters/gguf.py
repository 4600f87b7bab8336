"""Export a model spec to a llama.cpp GGUF file (gguf-py's ``GGUFWriter``).

Three ways to fill the tensors, chosen by ``type``:

``auto``
    On an llmopt output folder (``quantization.json`` + ``quantization.safetensors``), every Linear
    quantized to a GGUF block format (q8_0, q4_0, q4_1, q5_0, q5_1) is written from its stored codes
    and scales with :meth:`QuantFormat.to_gguf_blocks`: the bytes llama.cpp reads dequantize exactly to
    the fake-quant weights saved in the folder (no re-quantization). Linears quantized to an int format
    (no GGUF type) are written as F32, which holds their fake-quant values exactly. Everything else is
    F16 (2-D; ``embedding_type`` / ``output_type`` override the token embedding / output head) or F32
    (1-D norms).
``f32`` / ``f16``
    Plain floats (1-D tensors always F32).
a llama.cpp type (``q4_0``, ``q4_k_m``, ``q6_k``, ...)
    An F32 GGUF is written to a temporary file and llama.cpp's own quantizer
    (``llama_model_quantize``) converts it, optionally guided by an importance matrix (``imatrix``):
    llama.cpp's imatrix is, per Linear, the mean of x_j² over calibration tokens for each input column
    j, and the quantizer minimises Σ_j imatrix_j · (w_j − ŵ_j)² instead of the plain squared error.

Layout follows llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``): architecture metadata, the
tokenizer (``tokenizer.ggml.pre`` detected so llama.cpp splits text exactly like the HF tokenizer), the
Q/K row permutation llama.cpp's rotary embedding expects (:func:`permute_qk`), no output tensor when the
embeddings are tied, tensor names from gguf-py's ``TensorNameMap``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from llmopt.errors import LLMOptError

log = logging.getLogger(__name__)

# llama.cpp ``enum llama_ftype`` (include/llama.h) of the types its quantizer produces.
LLAMA_FTYPES: dict[str, int] = {
    "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12,
    "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq2_xxs": 19,
    "iq2_xs": 20, "q2_k_s": 21, "iq3_xs": 22, "iq3_xxs": 23, "iq1_s": 24, "iq4_nl": 25, "iq3_s": 26,
    "iq3_m": 27, "iq2_s": 28, "iq2_m": 29, "iq4_xs": 30, "iq1_m": 31, "bf16": 32, "tq1_0": 36, "tq2_0": 37,
}  # fmt: skip
_ALIASES = {"q4_k": "q4_k_m", "q5_k": "q5_k_m", "q3_k": "q3_k_m"}
# llama.cpp refuses these without an importance matrix (llama-quant.cpp).
_NEED_IMATRIX = frozenset({"iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m", "q2_k_s"})
PLAIN_TYPES = ("auto", "f32", "f16")
GGUF_TYPES: tuple[str, ...] = (*PLAIN_TYPES, *LLAMA_FTYPES)

# Types the writer itself can produce for --embedding-type / --output-type (gguf-py's reference
# quantizers are bit-exact with llama.cpp's ``quantize_row_*_ref``).
_WRITER_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
_FILE_TYPE = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    gguf.GGMLQuantizationType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    gguf.GGMLQuantizationType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
}

# HF model_type → (GGUF architecture, Q/K rows permuted for llama.cpp's rotary layout)
_ARCHS: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),  # convert_hf_to_gguf.py writes Mistral as llama
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),  # NEOX rotary: no permutation, q/k/v biases
}

# convert_hf_to_gguf.py ``get_vocab_base_pre``: sha256 of str(tokenizer.encode(CHECK_TEXT)) → pre type.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ "
    "(multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai gpt2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM(2)
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
}
# Pre-tokenizer regexes of tokenizer.json ``Split`` steps → llama.cpp pre type (llama-vocab.cpp).
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


@dataclass(frozen=True)
class _Plan:
    """What to write: ``mode`` plain (writer only) or llama (llama.cpp quantizer), dense 2-D type, and
    the token-embedding / output-head types (ggml type names)."""

    mode: str
    dense: str
    embedding: str
    output: str


# --------------------------------------------------------------------------------------------------
# Public API


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
    threads: int | None = None,
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
            of ``imatrix_seq_len`` tokens.
    Returns:
        {"output", "type", "file_bytes", "tensor_types" {type: count}, "bits_per_weight" (all tensors),
        "linear_bits_per_weight" (2-D tensors but the embedding and head), "pre_tokenizer", "seconds"}.
    The file is written to ``output + ".tmp-<pid>"`` and renamed on success; on failure nothing is left.
    """
    t0 = time.perf_counter()
    plan = _plan(type, embedding_type, output_type)
    if imatrix is not None and plan.mode != "llama":
        raise LLMOptError(
            f"--imatrix only applies when llama.cpp quantizes (--type q4_0, q4_k_m, ...), not with --type {type}"
        )
    if plan.dense in _NEED_IMATRIX and imatrix is None:
        raise LLMOptError(f"llama.cpp needs an importance matrix for {plan.dense}: pass --imatrix DATA")
    out = Path(output)
    if out.suffix.lower() != ".gguf":
        raise LLMOptError(f"output {output} must end in .gguf")
    if out.exists() and not overwrite:
        raise LLMOptError(f"output file {out} already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise LLMOptError(f"output {out} is a folder; give a .gguf file name")

    from llmopt.models import load_model

    loaded = load_model(model_spec)
    model, tokenizer = loaded.model, loaded.tokenizer
    arch, permute = _architecture(model.config)
    if output_type and getattr(model.config, "tie_word_embeddings", False):
        log.warning("--output-type %s ignored: the embeddings are tied, there is no output tensor", output_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp_f32 = out.with_name(f"{out.name}.f32.tmp-{os.getpid()}")
    try:
        imatrix_data = None
        if imatrix is not None:
            imatrix_data = _load_imatrix(imatrix, model, tokenizer, arch, imatrix_samples, imatrix_seq_len)
        if plan.mode == "llama":  # llama.cpp quantizes from an all-F32 file
            pre = _write_gguf(tmp_f32, loaded, arch, permute, _Plan("plain", "f32", "f32", "f32"))
        else:
            pre = _write_gguf(tmp, loaded, arch, permute, plan)
        del model, tokenizer, loaded  # free the torch weights before llama.cpp loads the F32 file
        if plan.mode == "llama":
            _llama_quantize(tmp_f32, tmp, plan, imatrix_data, threads)
        report = _summary(tmp)
        os.replace(tmp, out)
    finally:
        for p in (tmp, tmp_f32):
            p.unlink(missing_ok=True)
    report = {
        "output": str(out),
        "type": type,
        **report,
        "pre_tokenizer": pre,
        "imatrix_entries": len(imatrix_data) if imatrix_data else 0,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("wrote %s (%.1f MiB, %.3f bits/weight)", out, report["file_bytes"] / 2**20, report["bits_per_weight"])
    return report


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF → GGUF row order of a Q (n_head = heads) or K (n_head = KV heads) projection.

    HF rotates the two halves of each head's dims; llama.cpp's rotary pairs adjacent dims, so the rows
    of each head, (2, hd/2), become (hd/2, 2) (``convert_hf_to_gguf.py`` ``LlamaModel.permute``).
    Works on any per-row array: weights (rows, in), biases (rows,), packed block bytes (rows, nbytes).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk` (GGUF → HF row order)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------------
# Planning


def _ggml_type(name: str, allowed: tuple[str, ...] | None, what: str) -> str:
    key = name.strip().lower()
    valid = allowed or tuple(
        t.name.lower() for t in gguf.GGMLQuantizationType if t.name not in ("I8", "I16", "I32", "I64", "F64")
    )
    if key not in valid:
        raise LLMOptError(f"unknown {what} {name!r}; valid: {', '.join(valid)}")
    return key


def _plan(type_: str, embedding_type: str | None, output_type: str | None) -> _Plan:
    key = _ALIASES.get(type_.strip().lower(), type_.strip().lower())
    if key not in GGUF_TYPES:
        raise LLMOptError(f"unknown --type {type_!r}; valid: {', '.join(GGUF_TYPES)}")
    if key in PLAIN_TYPES:
        allowed = _WRITER_TYPES
        dense = "f32" if key == "f32" else "f16"
        emb = _ggml_type(embedding_type, allowed, "--embedding-type") if embedding_type else dense
        outp = _ggml_type(output_type, allowed, "--output-type") if output_type else dense
        return _Plan("plain" if key != "auto" else "auto", dense, emb, outp)
    emb = _ggml_type(embedding_type, None, "--embedding-type") if embedding_type else ""
    outp = _ggml_type(output_type, None, "--output-type") if output_type else ""
    return _Plan("llama", key, emb, outp)


def _architecture(cfg: Any) -> tuple[gguf.MODEL_ARCH, bool]:
    mt = getattr(cfg, "model_type", None)
    if mt not in _ARCHS:
        names = ", ".join(sorted(_ARCHS))
        raise LLMOptError(f"GGUF export supports {names} models (LlamaForCausalLM-like), not {mt!r}")
    return _ARCHS[mt]


# --------------------------------------------------------------------------------------------------
# Writing


def _write_gguf(path: Path, loaded: Any, arch: gguf.MODEL_ARCH, permute: bool, plan: _Plan) -> str:
    """Write metadata, tokenizer and tensors of ``loaded`` to ``path``; return the pre-tokenizer name."""
    model, cfg = loaded.model, loaded.model.config
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(_model_name(loaded))
    _add_hparams(w, cfg)
    pre = _add_tokenizer(w, loaded, cfg.vocab_size)
    tensors = list(_tensors(model, loaded.path, arch, permute, plan))
    counts: Counter[gguf.GGMLQuantizationType] = Counter()
    for name, arr, qtype in tensors:
        w.add_tensor(name, arr, raw_dtype=qtype if arr.dtype == np.uint8 else None)
        if arr.ndim == 2 and name not in ("token_embd.weight", "output.weight"):
            counts[qtype] += int(arr.shape[0])
    main_type = counts.most_common(1)[0][0] if counts else gguf.GGMLQuantizationType.F32
    w.add_file_type(_FILE_TYPE.get(main_type, gguf.LlamaFileType.GUESSED))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pre


def _model_name(loaded: Any) -> str:
    return Path(loaded.gguf_path).stem if loaded.gguf_path else Path(loaded.path).name


def _add_hparams(w: gguf.GGUFWriter, cfg: Any) -> None:
    """Architecture metadata (``convert_hf_to_gguf.py`` ``TextModel.set_gguf_parameters``)."""
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_head)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", 10000.0)))
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    rs = getattr(cfg, "rope_scaling", None) or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3: the rope_freqs tensor (_llama3_rope_factors)
        raise LLMOptError(f"rope scaling {kind!r} has no llama.cpp equivalent; supported: linear, yarn, llama3")


def _llama3_rope_factors(cfg: Any) -> np.ndarray | None:
    """Per-frequency divisors of Llama 3.1 rope scaling (``LlamaModel.generate_extra_tensors``)."""
    rs = getattr(cfg, "rope_scaling", None) or {}
    if rs.get("rope_type", rs.get("type")) != "llama3":
        return None
    base = float(getattr(cfg, "rope_theta", 10000.0))
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _encode(arr: np.ndarray, type_name: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """float32 (rows, cols) → the array GGUFWriter stores for ``type_name`` (float or block bytes)."""
    qtype = gguf.GGMLQuantizationType[type_name.upper()]
    if qtype == gguf.GGMLQuantizationType.F32:
        return arr.astype(np.float32), qtype
    if qtype == gguf.GGMLQuantizationType.F16:
        return arr.astype(np.float16), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block:
        raise LLMOptError(f"{type_name} needs rows that are a multiple of {block}, got {arr.shape[-1]}")
    return gguf.quants.quantize(arr, qtype), qtype


def _load_quantized(folder: Path) -> tuple[dict, dict]:
    index_path = folder / "quantization.json"
    if not index_path.is_file():
        return {}, {}
    from safetensors.torch import load_file

    return json.loads(index_path.read_text()), load_file(str(folder / "quantization.safetensors"))


def _tensors(model: torch.nn.Module, folder: str, arch: gguf.MODEL_ARCH, permute: bool, plan: _Plan):
    """Yield (gguf name, array, ggml type) for every tensor of ``model`` (HF names mapped by gguf-py)."""
    from llmopt.formats import QParams, make_format

    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    index, qtensors = _load_quantized(Path(folder)) if plan.mode == "auto" else ({}, {})
    if plan.mode == "auto" and not index:
        log.info("no quantization.json in %s: --type auto writes F16 2-D tensors", folder)
    rope = _llama3_rope_factors(cfg)
    if rope is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope, gguf.GGMLQuantizationType.F32

    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LLMOptError(f"tensor {hf_name} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}")
        heads = None
        if permute and ".attn_q." in name:
            heads = n_head
        elif permute and ".attn_k." in name:
            heads = n_kv

        def perm(a: np.ndarray, heads: int | None = heads) -> np.ndarray:
            return permute_qk(a, heads) if heads else a

        linear = hf_name.removesuffix(".weight")
        entry = index.get(linear) if hf_name.endswith(".weight") else None
        if entry is not None:
            fmt = make_format(entry["format"], entry["bits"], entry["group_size"], entry["symmetric"])
            codes = qtensors[f"{linear}.codes"]
            qp = QParams(qtensors[f"{linear}.scale"].float(), qtensors[f"{linear}.zero"].float())
            if not torch.equal(fmt.dequantize(codes, qp), t.float()):
                raise LLMOptError(
                    f"the stored codes of {linear} do not reproduce its saved weight (a later stage changed "
                    "it?); export with --type f32 or f16"
                )
            if fmt.gguf_type is not None:
                yield name, perm(fmt.to_gguf_blocks(codes, qp)), fmt.gguf_type
                continue
            yield name, perm(t.float().numpy()), gguf.GGMLQuantizationType.F32  # int formats: exact F32
            continue
        arr = t.detach().float().cpu().numpy()
        if arr.ndim < 2:
            yield name, perm(arr), gguf.GGMLQuantizationType.F32
            continue
        kind = {"token_embd.weight": plan.embedding, "output.weight": plan.output}.get(name, plan.dense)
        data, qtype = _encode(perm(arr), kind)
        yield name, data, qtype


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _add_tokenizer(w: gguf.GGUFWriter, loaded: Any, vocab_size: int) -> str:
    """Write the tokenizer; returns the ``tokenizer.ggml.pre`` value ("default" for SentencePiece)."""
    tok, folder = loaded.tokenizer, Path(loaded.path)
    tj = json.loads(tok.backend_tokenizer.to_str()) if getattr(tok, "is_fast", False) else {}
    model_kind = tj.get("model", {}).get("type")
    byte_level = "ByteLevel" in json.dumps([tj.get("pre_tokenizer"), tj.get("decoder")])
    if model_kind == "BPE" and byte_level and not tj["model"].get("byte_fallback"):
        pre = _pre_tokenizer(tok, tj, loaded.gguf_path)
        _add_bpe_vocab(w, tok, tj, vocab_size, pre)
    elif (folder / "tokenizer.model").is_file() or (model_kind == "BPE" and tj["model"].get("byte_fallback")):
        pre = "default"
        _add_spm_vocab(w, tok, tj, folder, vocab_size)
    else:
        raise LLMOptError(
            f"tokenizer of {loaded.spec} ({model_kind or type(tok).__name__}) is neither byte-level BPE nor "
            "SentencePiece: GGUF export supports those two"
        )
    _add_special(w, tok)
    return pre


def _pre_tokenizer(tok: Any, tj: dict, source_gguf: str | None) -> str:
    """The llama.cpp pre-tokenizer that splits text like ``tok`` does.

    A model converted from a GGUF keeps its source's value; otherwise the hash of the tokenization of
    ``CHECK_TEXT`` (``convert_hf_to_gguf.py``), then the structure of tokenizer.json's pre-tokenizer.
    """
    if source_gguf:
        reader = gguf.GGUFReader(source_gguf)
        field = reader.fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    digest = sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in _PRE_HASHES:
        return _PRE_HASHES[digest]
    if tj.get("normalizer") is None:
        steps = tj.get("pre_tokenizer") or {}
        steps = steps.get("pretokenizers", [steps]) if steps.get("type") == "Sequence" else [steps]
        kinds = [s.get("type") for s in steps]
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
            return "gpt-2"
        if (
            kinds == ["Digits", "ByteLevel"]
            and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space")
        ):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            regex = steps[0].get("pattern", {}).get("Regex")
            if regex == _LLAMA3_REGEX:
                return "llama-bpe"
            if regex == _QWEN2_REGEX:
                return "qwen2"
    raise LLMOptError(
        "the byte-level BPE pre-tokenizer of this model is not recognised (supported: gpt-2, smollm, "
        "llama-bpe, qwen2); llama.cpp would split text differently than the HF tokenizer"
    )


def _looks_special(token: str) -> bool:
    """``convert_hf_to_gguf.py`` ``does_token_look_special``."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _add_bpe_vocab(w: gguf.GGUFWriter, tok: Any, tj: dict, vocab_size: int, pre: str) -> None:
    """Byte-level BPE vocabulary (``get_vocab_base``): tokens, types and merges."""
    vocab = tok.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise LLMOptError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            special = decoder[i].special if i in decoder else False
            types.append(gguf.TokenType.CONTROL if special or _looks_special(t) else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)


def _add_spm_vocab(w: gguf.GGUFWriter, tok: Any, tj: dict, folder: Path, vocab_size: int) -> None:
    """SentencePiece vocabulary (Llama 1/2, Mistral): tokens, scores, types (``tokenizer.ggml.model``
    llama). With a ``tokenizer.model``, gguf-py's ``SentencePieceVocab`` reads the model's own scores.
    With only a byte-fallback BPE tokenizer.json, each merged token scores −(rank of its merge): llama.cpp's
    SPM tokenizer merges the pair whose result scores highest, which is then HF's lowest-rank merge
    (gguf-py's ``LlamaHfVocab`` gives every token −1000, which makes llama.cpp split text differently)."""
    if (folder / "tokenizer.model").is_file():
        from gguf.vocab import SentencePieceVocab

        try:
            tokens, scores, types = map(list, zip(*SentencePieceVocab(folder).all_tokens()))
        except Exception as e:  # gguf-py / sentencepiece raise various errors on odd files
            raise LLMOptError(f"could not read the SentencePiece model in {folder}: {e}") from e
    else:
        vocab, added = tok.get_vocab(), tok.get_added_vocab()
        special_ids = set(tok.all_special_ids)
        rank = {}
        for r, m in enumerate(tj["model"].get("merges", [])):
            rank.setdefault("".join(m.split(" ", 1) if isinstance(m, str) else m), r)
        reverse = {i: t for t, i in vocab.items()}
        tokens, scores, types = [], [], []
        for i in range(min(vocab_size, max(vocab.values()) + 1)):
            t = reverse.get(i, f"[PAD{i}]")
            if i not in reverse:
                ttype = gguf.TokenType.UNUSED
            elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                ttype = gguf.TokenType.BYTE
            elif i in special_ids or (t in added and _looks_special(t)):
                ttype = gguf.TokenType.CONTROL
            elif t in added:
                ttype = gguf.TokenType.USER_DEFINED
            else:
                ttype = gguf.TokenType.NORMAL
            tokens.append(t.encode())
            scores.append(-float(rank[t]) if t in rank else 0.0 if ttype == gguf.TokenType.NORMAL else -1000.0)
            types.append(ttype)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    first = tok.convert_ids_to_tokens(tok("a", add_special_tokens=False)["input_ids"][:1])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_add_space_prefix(bool(first) and first[0].startswith("▁"))  # llama.cpp prepends "▁" if set
    w.add_token_list(tokens[:vocab_size])
    w.add_token_scores(scores[:vocab_size])
    w.add_token_types(types[:vocab_size])


def _add_special(w: gguf.GGUFWriter, tok: Any) -> None:
    """Special ids, add-BOS/EOS flags measured on the HF tokenizer itself, chat template."""
    ids = {
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "unk": tok.unk_token_id,
        "pad": tok.pad_token_id,
    }
    for kind, tid in ids.items():
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(int(tid))
    with_special = tok("a b", add_special_tokens=True)["input_ids"]
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    bos, eos = ids["bos"], ids["eos"]
    add_bos = bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos]
    w.add_add_bos_token(bool(add_bos))
    w.add_add_eos_token(bool(add_eos))
    template = getattr(tok, "chat_template", None)
    if template:
        w.add_chat_template(template)


# --------------------------------------------------------------------------------------------------
# llama.cpp quantizer


def _llama_quantize(src: Path, dst: Path, plan: _Plan, imatrix: dict[str, np.ndarray] | None, threads) -> None:
    """``llama_model_quantize(src → dst)`` with ``plan``'s ftype, embedding/output types and imatrix."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[plan.dense]
    params.nthread = threads or os.cpu_count() or 1
    if plan.embedding:
        params.token_embedding_type = int(gguf.GGMLQuantizationType[plan.embedding.upper()])
    if plan.output:
        params.output_tensor_type = int(gguf.GGMLQuantizationType[plan.output.upper()])
    keep = []  # ctypes buffers must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            buf = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(buf)
            entries[i].name = name.encode()
            entries[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = buf.size
        entries[len(imatrix)].name = None  # the list ends with a NULL name (llama-quant.cpp)
        params.imatrix = entries
        keep.append(entries)
    errors: list[str] = []
    with _capture_llama_log(errors):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        reason = errors[-1].strip() if errors else f"return code {rc}"
        raise LLMOptError(f"llama.cpp could not quantize to {plan.dense}: {reason}")


class _capture_llama_log:
    """Route llama.cpp's log to ``logging`` (debug) while quantizing; keep warnings/errors for messages."""

    def __init__(self, sink: list[str]):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.sink = sink

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            msg = text.decode("utf-8", "replace")
            if level in (2, 3):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
                self.sink.append(msg)
            log.debug("llama.cpp: %s", msg.rstrip())

        self._callback = callback

    def __enter__(self):
        self._llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc) -> None:
        from llama_cpp import _logger

        self._llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


# --------------------------------------------------------------------------------------------------
# Importance matrix


def _load_imatrix(spec: str, model, tokenizer, arch, samples: int, seq_len: int) -> dict[str, np.ndarray]:
    """GGUF tensor name → (in,) float32 mean x², from an imatrix file or computed on data ``spec``."""
    path = Path(spec).expanduser()
    if path.is_file():
        data = _read_imatrix_file(path)
    else:
        data = compute_imatrix(model, tokenizer, spec, samples, seq_len, arch)
    if not data:
        raise LLMOptError(f"importance matrix {spec} has no entries")
    return data


def compute_imatrix(
    model, tokenizer, data: str, samples: int = 32, seq_len: int = 512, arch=gguf.MODEL_ARCH.LLAMA
) -> dict[str, np.ndarray]:
    """llama.cpp's importance matrix on ``data``: per decoder Linear, mean over tokens of x_j² for each
    input column j (``tools/imatrix``: in_sum2 / count), keyed by GGUF tensor name."""
    from llmopt.calibration import layer_statistics
    from llmopt.data import calibration_windows

    windows = calibration_windows(data, tokenizer, samples, seq_len, seed=0, model=model)
    tmap = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    out = {}
    for layer in layer_statistics(model, windows, "act_sq_norm"):
        for linear, s in layer.items():
            name = tmap.get_name(linear + ".weight", try_suffixes=(".weight",))
            if name is not None and s.act_sq_norm is not None and s.tokens:
                out[name] = (s.act_sq_norm / s.tokens).cpu().numpy().astype(np.float32)
    log.info("importance matrix from %d windows x %d tokens of %s: %d entries", samples, seq_len, data, len(out))
    return out


def _read_imatrix_file(path: Path) -> dict[str, np.ndarray]:
    """llama.cpp imatrix file: GGUF (``<name>.in_sum2`` / ``<name>.counts``) or the legacy ``.dat``."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        reader = gguf.GGUFReader(path)
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
        out = {}
        for key, sums in tensors.items():
            if key.endswith(".in_sum2"):
                name = key.removesuffix(".in_sum2")
                counts = tensors.get(name + ".counts")
                if counts is None:
                    raise LLMOptError(f"imatrix {path}: {key} has no matching .counts tensor")
                sums = sums.reshape(counts.size, -1)
                c = counts.reshape(-1, 1)
                out[name] = np.where(c > 0, sums / np.where(c > 0, c, 1), 1.0).reshape(-1).astype(np.float32)
        return out
    try:  # legacy: n; per entry: len, name, ncall, nval, float[nval] (= mean · ncall)
        raw = path.read_bytes()
        at, out = 4, {}
        n = int(np.frombuffer(raw, np.int32, 1, 0)[0])
        for _ in range(n):
            ln = int(np.frombuffer(raw, np.int32, 1, at)[0])
            name = raw[at + 4 : at + 4 + ln].decode()
            at += 4 + ln
            ncall, nval = (int(x) for x in np.frombuffer(raw, np.int32, 2, at))
            vals = np.frombuffer(raw, np.float32, nval, at + 8).copy()
            at += 8 + 4 * nval
            out[name] = vals / ncall if ncall > 0 else vals
        return out
    except (ValueError, UnicodeDecodeError, IndexError) as e:
        raise LLMOptError(f"{path} is neither a GGUF imatrix nor a legacy llama.cpp .dat imatrix") from e


# --------------------------------------------------------------------------------------------------
# Report


def _summary(path: Path) -> dict:
    """Read the written file back: per-type tensor counts and bits per weight."""
    reader = gguf.GGUFReader(path)
    types: Counter[str] = Counter()
    n_all = b_all = n_lin = b_lin = 0
    for t in reader.tensors:
        types[t.tensor_type.name] += 1
        n, b = int(t.n_elements), int(t.n_bytes)
        n_all, b_all = n_all + n, b_all + b
        if len(t.shape) == 2 and t.name not in ("token_embd.weight", "output.weight"):
            n_lin, b_lin = n_lin + n, b_lin + b
    return {
        "file_bytes": path.stat().st_size,
        "tensor_types": dict(types),
        "bits_per_weight": 8 * b_all / max(1, n_all),
        "linear_bits_per_weight": 8 * b_lin / max(1, n_lin),
    }
