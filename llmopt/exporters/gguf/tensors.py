"""Model tensors → GGUF tensors: names from gguf-py's ``TensorNameMap``, and the layout changes llama.cpp
expects (``convert_hf_to_gguf.py`` ``modify_tensors`` of each model class).

* Q/K rows permuted for llama.cpp's rotary (LLAMA only, :func:`permute_qk`);
* Gemma norms stored as 1 + w (:attr:`ArchSpec.norm_shift`);
* transformers ``Conv1D`` weights (GPT-2: ``c_attn``, ``c_proj``, ``c_fc``), stored (in, out), transposed;
* fused tensors (phi3 ``qkv_proj`` / ``gate_up_proj``, GPT-2 ``c_attn``) written as they are: llama.cpp's
  ``attn_qkv`` / ``ffn_up`` split them in the same order;
* Gemma's query scaling difference folded into ``q_proj`` or ``q_norm`` (:func:`attn_fold_factor`);
* a tied output head is not written (llama.cpp reuses the token embedding); when a stage quantized it, its
  stored codes (``tied_to`` the embedding) are the token embedding's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import gguf
import numpy as np
import torch

from llmopt.errors import LLMOptError
from llmopt.exporters.gguf.auto_types import Deferred, LlamaMix, llama_mix
from llmopt.exporters.gguf.codes import StoredLinear, check_reproduces, load_stored, saved_dtypes, to_blocks
from llmopt.exporters.gguf.hparams import ArchSpec, attn_fold_factor, llama3_rope_factors
from llmopt.exporters.gguf.plan import WRITER_TYPES, Plan

log = logging.getLogger(__name__)

GGMLType = gguf.GGMLQuantizationType
# 2-D tensors that are not Linears: excluded from "linear bits per weight", typed by --embedding/--output-type
EMBEDDING, OUTPUT, POSITION = "token_embd.weight", "output.weight", "position_embd.weight"


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


def encode(arr: np.ndarray, type_name: str) -> tuple[np.ndarray, GGMLType]:
    """float32 (rows, cols) → the array GGUFWriter stores for ``type_name`` (float or block bytes)."""
    qtype = GGMLType[type_name.upper()]
    if qtype == GGMLType.F32:
        return arr.astype(np.float32), qtype
    if qtype == GGMLType.F16:
        return arr.astype(np.float16), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block:
        raise LLMOptError(f"{type_name} needs rows that are a multiple of {block}, got {arr.shape[-1]}")
    return gguf.quants.quantize(arr, qtype), qtype


def transposed_weights(model: torch.nn.Module) -> set[str]:
    """Parameter names of weights stored (in, out): transformers ``Conv1D``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return set()
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}


def iter_tensors(
    model: torch.nn.Module, folder: str, spec: ArchSpec, plan: Plan, deferred: Deferred | None = None, read=None
) -> Iterator[tuple[str, np.ndarray, GGMLType]]:
    """Yield (GGUF name, array, ggml type) for every tensor of ``model``; a tensor on the meta device is
    read with ``read(name)`` when its turn comes (a streamed model, :mod:`.stream`).

    ``plan.mode == "auto"``: Linears with stored codes are written from them (:mod:`.codes`); the other
    2-D tensors in llama.cpp's type for the folder's file type (:mod:`.auto_types`; those the writer cannot
    produce are yielded F32 and listed in ``deferred`` for llama.cpp), or F16 in a folder without one (BF16
    when saved in bfloat16); ``--embedding-type`` / ``--output-type`` override; 1-D tensors as F32.
    """
    cfg = model.config
    n_layer = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    n_head = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    tmap = gguf.get_tensor_name_map(spec.arch, n_layer)
    tied = spec.tied_only or bool(getattr(cfg, "tie_word_embeddings", False))
    stored = load_stored(folder) if plan.mode == "auto" else {}
    dtypes = saved_dtypes(folder) if plan.mode == "auto" else {}
    if plan.mode == "auto" and not stored:
        log.info("no quantization.json in %s: --type auto writes 2-D tensors as F16 (BF16 if saved so)", folder)
    fold = attn_fold_factor(spec, cfg)
    if fold != 1.0:
        log.info("%s: query scaling ratio %.6g folded into %s", spec.model_type, fold, spec.attn_fold)
    transposed = transposed_weights(model)
    buffers = {n for n, _ in model.named_buffers()}
    mix = _llama_mix(model, stored, spec, tmap, tied, transposed) if stored else None
    stored = with_tied_embedding(stored)
    if mix is not None and deferred is not None:
        deferred.ftype = mix.ftype  # the file's general.file_type
    rope = llama3_rope_factors(cfg) if spec.arch == gguf.MODEL_ARCH.LLAMA else None
    if rope is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope, GGMLType.F32

    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            if hf_name in buffers:  # e.g. GPT-2's causal-mask buffers
                continue
            raise LLMOptError(f"tensor {hf_name} has no GGUF name for {spec.name}")
        if t.is_meta:
            if read is None:
                raise LLMOptError(f"internal: {hf_name} is on the meta device and no reader was given")
            t = read(hf_name)
        heads = None
        if spec.permute_qk and ".attn_q." in name:
            heads = n_head
        elif spec.permute_qk and ".attn_k." in name:
            heads = n_kv

        def perm(a: np.ndarray, heads: int | None = heads) -> np.ndarray:
            return permute_qk(a, heads) if heads else a

        q_factor = fold if spec.attn_fold == "q_proj" and ".attn_q." in name else 1.0
        linear = hf_name.removesuffix(".weight")
        entry = stored.get(linear) if hf_name.endswith(".weight") else None
        if entry is not None:
            if (name, True) in ((EMBEDDING, plan.explicit_embedding), (OUTPUT, plan.explicit_output)):
                log.warning("%s is written from its stored %s codes: its --*-type is ignored", name, entry.fmt)
            check_reproduces(linear, entry, t, dtypes.get(hf_name, torch.float32))
            blocks, qtype = to_blocks(linear, entry, q_factor)
            yield name, perm(blocks), qtype
            continue
        arr = t.detach().float().cpu().numpy()
        if hf_name in transposed:
            arr = np.ascontiguousarray(arr.T)
        if spec.norm_shift and hf_name.endswith("norm.weight"):
            arr = arr + np.float32(spec.norm_shift)
        if spec.attn_fold == "q_norm" and ".attn_q_norm." in name:
            q_factor = fold
        if q_factor != 1.0:
            arr = arr * np.float32(q_factor)
        if arr.ndim < 2:
            yield name, perm(arr), GGMLType.F32
            continue
        kind, explicit = {
            EMBEDDING: (plan.embedding, plan.explicit_embedding),
            OUTPUT: (plan.output, plan.explicit_output),
        }.get(name, (plan.dense, False))
        chosen = mix.types.get(name) if mix is not None and not explicit else None
        if chosen is not None:
            kind = chosen.name.lower()
            if kind not in WRITER_TYPES:  # llama.cpp quantizes it afterwards, from F32
                if deferred is None:
                    raise LLMOptError(f"internal: {name} needs llama.cpp's quantizer ({chosen.name})")
                deferred.types[name] = chosen
                kind = "f32"
        if plan.mode == "auto" and not explicit and kind == "f16" and dtypes.get(hf_name) == torch.bfloat16:
            kind = "bf16"  # exact; F16 would round bfloat16's range
        data, qtype = encode(perm(arr), kind)
        yield name, data, qtype


def with_tied_embedding(stored: dict[str, StoredLinear]) -> dict[str, StoredLinear]:
    """``stored`` plus, for a quantized output head tied to the token embedding, the same codes under the
    embedding's module name: the tied head is not written, the embedding (the same tensor) is, from them."""
    tied = {s.tied_to: s for s in stored.values() if s.tied_to is not None and s.tied_to not in stored}
    return {**stored, **tied} if tied else stored


def _llama_mix(
    model: torch.nn.Module,
    stored: dict[str, StoredLinear],
    spec: ArchSpec,
    tmap: gguf.TensorNameMap,
    tied: bool,
    transposed: set[str],
) -> LlamaMix | None:
    """:func:`.auto_types.llama_mix` of ``model``: the GGUF name and shape of every tensor it writes."""
    shapes: dict[str, tuple[int, ...]] = {}
    coded: dict[str, GGMLType] = {}
    entries = with_tied_embedding(stored)
    for hf_name, t in model.state_dict().items():
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or (tied and hf_name == "lm_head.weight"):
            continue
        shapes[name] = tuple(t.shape)[::-1] if hf_name in transposed else tuple(t.shape)
        entry = entries.get(hf_name.removesuffix(".weight")) if hf_name.endswith(".weight") else None
        if entry is not None and entry.fmt.gguf_type is not None:
            coded[name] = entry.fmt.gguf_type
    return llama_mix(stored, shapes, coded, model.config, spec)


def is_linear_tensor(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D GGUF tensor that is a Linear (not an embedding or the output head)."""
    return len(shape) == 2 and name not in (EMBEDDING, OUTPUT, POSITION)
