"""Stored codes of an llmopt output folder → GGUF blocks that dequantize to exactly the same numbers.

An llmopt folder keeps, for every quantized Linear, its integer codes (out, in) and fp16 group
parameters (``quantization.safetensors`` / ``quantization.json``). ``--type auto`` writes those codes,
never the float weight:

* GGUF block formats (q8_0, q4_0, q4_1, q5_0, q5_1, the K-quants, IQ4_NL / IQ4_XS: ``GGUF_EXACT``) are already
  GGUF blocks.
* An int format is written as the GGUF type whose arithmetic is the same when its groups are whole
  multiples of 32 columns: symmetric int4 / int5, value = s·(q − 2ᵇ⁻¹), IS q4_0 / q5_0 with d = s
  (one group of 64 is two blocks sharing d); asymmetric int4 / int5, value = s·(q − z), is q4_1 / q5_1
  with d = s and m = −s·z when that m is an fp16 number; symmetric int8, s·(q − 128), is q8_0 when no
  code is 0 (q8_0 holds −127..127).
* Anything else (int2/3/6/7, groups of 16, an m fp16 cannot hold) is refused with a one-line error:
  GGUF has no type holding it exactly, and writing F32 instead would silently make a 32-bit file.

Every conversion is checked: the blocks, dequantized by gguf-py (llama.cpp's reference arithmetic),
must equal the format's own dequantization bit for bit, else the export stops.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch

from llmopt.core.llama_types import DEFAULT_TYPE
from llmopt.errors import LLMOptError, read_json
from llmopt.formats import GGUF_BLOCK, GGUF_FORMATS, IntFormat, QParams, QuantFormat, make_format
from llmopt.formats.params import STORED_EXTRA

log = logging.getLogger(__name__)

INDEX_FILE = "quantization.json"
CODES_FILE = "quantization.safetensors"
# formats whose codes are GGUF blocks: every registered GGUF format that packs itself (q4_0 ... q8_0, K-quants, IQ4)
GGUF_EXACT = tuple(n for n, f in GGUF_FORMATS.items() if type(f).to_gguf_blocks is not QuantFormat.to_gguf_blocks)
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class StoredLinear:
    """One quantized Linear of a folder: codes (out, in), group parameters (out, n_groups), format, whether
    the model file stores the weight as (in, out) (transformers Conv1D), and for a quantized output head tied
    to the token embedding, that embedding's module name (its tensor is written from these codes)."""

    fmt: QuantFormat
    codes: torch.Tensor
    qp: QParams
    transposed: bool = False
    tied_to: str | None = None  # a tied output head: the input embedding module holding the same tensor
    llama_ftype: str | None = None  # the llama.cpp file type whose mix the stage followed (quantization.json)

    def dequantize(self) -> torch.Tensor:
        """Float32 (out, in) values of the codes."""
        return self.fmt.dequantize(self.codes, self.qp)


_ENTRY_KEYS = {"format": str, "bits": int, "group_size": (int, type(None)), "symmetric": bool}


def read_index(folder: str | Path) -> dict[str, dict]:
    """``quantization.json`` of an llmopt folder ({} when there is none), checked: every entry names a
    format, and ``quantization.safetensors`` holds its codes, scales and zeros."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return {}
    hint = "re-run llmopt compress, or export with --type f32 / --quant none after removing the file"
    index = read_json(path, "quantization index")
    if not isinstance(index, dict):
        raise LLMOptError(f"{path} is not a JSON object: {hint}")
    for linear, entry in index.items():
        bad = not isinstance(entry, dict) or any(not isinstance(entry.get(k), t) for k, t in _ENTRY_KEYS.items())
        if bad:
            raise LLMOptError(f"{path}: the entry of {linear} is malformed: {hint}")
        try:
            entry_format(entry)
        except LLMOptError as e:
            raise LLMOptError(f"{path}: {linear}: {e}") from None
        if entry.get("llama_ftype") is not None and entry["llama_ftype"] not in DEFAULT_TYPE:
            raise LLMOptError(f"{path}: {linear} names an unknown llama.cpp file type {entry['llama_ftype']!r}: {hint}")
    if index:
        codes = Path(folder) / CODES_FILE
        if not codes.is_file():
            raise LLMOptError(f"{folder} has {INDEX_FILE} but no {CODES_FILE} (the stored codes): {hint}")
        from llmopt.checkpoint import safetensors_header

        names = safetensors_header(codes)
        for linear in index:
            for part in ("codes", "scale", "zero"):
                if f"{linear}.{part}" not in names:
                    raise LLMOptError(f"{codes} lacks {linear}.{part}: {hint}")
    return index


def entry_format(entry: dict) -> QuantFormat:
    """The format of a ``quantization.json`` entry (its format, bits, group_size, symmetric)."""
    return make_format(entry["format"], entry["bits"], entry["group_size"], entry["symmetric"])


def refusal(linear: str, fmt: QuantFormat, why: str) -> LLMOptError:
    """The one-line error for a Linear whose format no GGUF type holds exactly."""
    return LLMOptError(
        f"{linear} is quantized to {fmt}, which {why}; GGUF holds exactly only {', '.join(GGUF_EXACT)} "
        "(and int4/int5 groups that are multiples of 32, symmetric int8): pass --type f32 to write the "
        "dequantized weights as plain floats (f16 rounds them), or a llama.cpp type to re-quantize"
    )


def precheck(index: dict[str, dict], in_features: dict[str, int] | None = None) -> None:
    """Refuse before any weight is read when a stored format can never be written exactly.

    ``in_features`` (Linear → input width) resolves per-channel groups; without it they pass here and
    are checked again when written."""
    for linear, entry in index.items():
        fmt = entry_format(entry)
        if fmt.gguf_type is not None:
            continue
        width = fmt.group_size or (in_features or {}).get(linear)
        if fmt.bits not in (4, 5, 8):
            raise refusal(linear, fmt, f"GGUF has no {fmt.bits}-bit block type")
        if fmt.bits == 8 and not fmt.symmetric:
            raise refusal(linear, fmt, "q8_0 has no zero-point")
        if width is not None and width % GGUF_BLOCK:
            raise refusal(linear, fmt, f"has groups of {width} columns, not whole GGUF blocks of {GGUF_BLOCK}")


def load_stored(folder: str | Path) -> dict[str, StoredLinear]:
    """Every quantized Linear of ``folder`` ({} for a folder without ``quantization.json``)."""
    index = read_index(folder)
    if not index:
        return {}
    from safetensors.torch import load_file

    tensors = load_file(str(Path(folder) / CODES_FILE))
    out = {}
    for linear, entry in index.items():
        extra = {k: tensors[f"{linear}.{k}"].float() for k in STORED_EXTRA if f"{linear}.{k}" in tensors}
        qp = QParams(tensors[f"{linear}.scale"].float(), tensors[f"{linear}.zero"].float(), **extra)
        tied = entry.get("tied_to") if isinstance(entry.get("tied_to"), str) else None
        out[linear] = StoredLinear(
            entry_format(entry),
            tensors[f"{linear}.codes"],
            qp,
            bool(entry.get("transposed")),
            tied_to=tied,
            llama_ftype=entry.get("llama_ftype"),
        )
    return out


def saved_dtypes(folder: str | Path) -> dict[str, torch.dtype]:
    """dtype of every tensor in the folder's model safetensors files, read from their headers."""
    from safetensors import safe_open

    out: dict[str, torch.dtype] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        if path.name == CODES_FILE:
            continue
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = _DTYPES.get(f.get_slice(name).get_dtype(), torch.float32)
    return out


def check_reproduces(linear: str, stored: StoredLinear, weight: torch.Tensor, saved_dtype: torch.dtype) -> None:
    """The codes must reproduce the folder's saved weight: their float32 values, cast to the dtype the
    folder saved that weight in, equal it bit for bit (a bfloat16 folder may hold a rounding of the
    codes' values; the GGUF gets the codes). ``weight``: as loaded, in the module's layout."""
    deq = stored.dequantize()
    w = weight.detach()
    w = w.t() if stored.transposed else w
    saved = w.to(saved_dtype)
    if deq.shape != saved.shape or not torch.equal(deq.to(saved_dtype), saved):
        raise LLMOptError(
            f"the stored codes of {linear} do not reproduce its saved weight (a later stage changed it?); "
            "export with --type f32 or f16"
        )
    if saved_dtype != torch.float32 and not torch.equal(deq, saved.float()):
        log.info("%s: the folder's %s weight rounds the codes' values; the GGUF holds the codes", linear, saved_dtype)


def _as_gguf(linear: str, stored: StoredLinear) -> tuple[QuantFormat, torch.Tensor, QParams]:
    """The GGUF block format, codes and block parameters (out, n_blocks) that equal ``stored``."""
    fmt, codes, qp = stored.fmt, stored.codes, stored.qp
    if fmt.gguf_type is not None:
        return fmt, codes, qp
    assert isinstance(fmt, IntFormat)
    cols = codes.shape[1]
    entry = {"format": "int", "bits": fmt.bits, "group_size": fmt.group_size or cols, "symmetric": fmt.symmetric}
    precheck({linear: entry})
    per_block = cols // GGUF_BLOCK // qp.n_groups  # blocks sharing one group's parameters
    scale = qp.scale.repeat_interleave(per_block, dim=1)
    zero = qp.zero.repeat_interleave(per_block, dim=1)
    if fmt.bits == 8:
        if int(codes.min()) < 1:
            raise refusal(linear, fmt, "uses code 0 (value −128·s), which q8_0 (−127..127) cannot hold")
        return (
            GGUF_FORMATS["q8_0"],
            (codes.to(torch.int16) - 128).to(torch.int8),
            QParams(scale, torch.zeros_like(scale)),
        )
    if fmt.symmetric:
        return GGUF_FORMATS[f"q{fmt.bits}_0"], codes, QParams(scale, torch.zeros_like(scale))
    m = -scale * zero
    if not torch.equal(m.to(torch.float16).float(), m):
        raise refusal(linear, fmt, "has zero-points whose offset −s·z is not an fp16 number (the q4_1/q5_1 min)")
    return GGUF_FORMATS[f"q{fmt.bits}_1"], codes, QParams(scale, m)


def to_blocks(linear: str, stored: StoredLinear, factor: float = 1.0) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """GGUF bytes (out, n_bytes) of ``stored`` and their type, verified bit for bit against the codes.

    ``factor``: a power of two the values are multiplied by (a scale folded into this tensor), applied to
    the block scales (and mins) exactly; any other factor cannot keep the codes and is refused."""
    gfmt, codes, qp = _as_gguf(linear, stored)
    want = stored.dequantize()
    if factor != 1.0:
        if math.frexp(factor)[0] != 0.5:
            raise LLMOptError(
                f"{linear} must be scaled by {factor:.6g} for llama.cpp (query_pre_attn_scalar), which its "
                "quantized codes cannot absorb exactly; export with --type f32 or f16"
            )
        # every value is linear in the fp16 super-/block scales and offsets; integer codes stay (zero is 0
        # or an offset in value units for GGUF formats)
        qp = replace(qp.on_grid(), scale=qp.scale * factor, zero=qp.zero * factor)
        if qp.super_scale is not None:
            qp = replace(qp, super_scale=qp.super_scale * factor)
        if qp.super_zero is not None:
            qp = replace(qp, super_zero=qp.super_zero * factor)
        want = want * factor
    blocks = gfmt.to_gguf_blocks(codes, qp)
    got = torch.from_numpy(gguf.quants.dequantize(blocks, gfmt.gguf_type).reshape(want.shape).astype(np.float32))
    if not torch.equal(got.view(torch.int32), want.contiguous().view(torch.int32)):
        raise refusal(linear, stored.fmt, f"does not come out of {gfmt.name} bit for bit (checked after packing)")
    return blocks, gfmt.gguf_type
