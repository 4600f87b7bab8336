"""llama.cpp's importance matrix: per Linear, the mean of x_j² over calibration tokens for each input column j.

llama.cpp's quantizer then minimises Σ_j imatrix_j · (w_j − ŵ_j)² instead of the plain squared error.
Read from a llama.cpp imatrix file (GGUF ``*.in_sum2`` / ``*.counts`` or the legacy ``.dat``) or computed
with llmopt's calibration engine on a data spec.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llmopt.errors import LLMOptError

log = logging.getLogger(__name__)


def load_imatrix(
    spec: str,
    model: Any,
    tokenizer: Any,
    arch: gguf.MODEL_ARCH,
    samples: int,
    seq_len: int,
    data: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """GGUF tensor name → (in,) float32 mean x², from an imatrix file (``data``: already read) or
    computed on data ``spec``; a file's entries must name this model's Linears with their widths."""
    path = Path(spec).expanduser()
    if data is None and path.is_file():
        data = read_imatrix_file(path)
    if data is not None:
        _check_against(data, model, arch, spec)
    else:
        data = compute_imatrix(model, tokenizer, spec, samples, seq_len, arch, seed=seed)
    if not data:
        raise LLMOptError(f"importance matrix {spec} has no entries")
    return data


def _check_against(data: dict[str, np.ndarray], model: Any, arch: gguf.MODEL_ARCH, spec: str) -> None:
    """Every entry: a GGUF tensor of this model, as many values as the Linear has input columns, finite, >= 0."""
    from torch import nn

    tmap = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    widths = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if w is not None and w.dim() == 2:
            gname = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
            if gname is not None:  # Conv1D stores (in, out)
                widths[gname + ".weight"] = int(w.shape[1] if isinstance(mod, nn.Linear) else w.shape[0])
                widths[gname] = widths[gname + ".weight"]
    for name, values in data.items():
        if name not in widths:
            raise LLMOptError(f"importance matrix {spec} has an entry '{name}' this model does not have: wrong model?")
        if values.size % widths[name] or not values.size:
            raise LLMOptError(
                f"importance matrix {spec}: '{name}' has {values.size} values, the Linear {widths[name]} columns"
            )
        if not np.isfinite(values).all() or (values < 0).any():
            raise LLMOptError(f"importance matrix {spec}: '{name}' has negative or non-finite values: corrupt file")


def compute_imatrix(
    model: Any,
    tokenizer: Any,
    data: str,
    samples: int = 32,
    seq_len: int = 512,
    arch: gguf.MODEL_ARCH | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """llama.cpp's importance matrix on ``data``: per decoder Linear, mean over tokens of x_j² for each
    input column j (``tools/imatrix``: in_sum2 / count), keyed by GGUF tensor name."""
    from llmopt.calibration import layer_statistics
    from llmopt.data import calibration_windows

    if arch is None:
        from llmopt.exporters.gguf.hparams import arch_of

        arch = arch_of(getattr(model.config, "model_type", None)).arch
    windows = calibration_windows(data, tokenizer, samples, seq_len, seed=seed, model=model)
    tmap = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    out = {}
    for layer in layer_statistics(model, windows, "act_sq_norm"):
        for linear, s in layer.items():
            name = tmap.get_name(linear + ".weight", try_suffixes=(".weight",))
            if name is not None and s.act_sq_norm is not None and s.tokens:
                out[name] = (s.act_sq_norm / s.tokens).cpu().numpy().astype(np.float32)
    log.info("importance matrix from %d windows x %d tokens of %s: %d entries", samples, seq_len, data, len(out))
    return out


def read_imatrix_file(path: Path) -> dict[str, np.ndarray]:
    """llama.cpp imatrix file: GGUF (``<name>.in_sum2`` / ``<name>.counts``) or the legacy ``.dat``."""

    def corrupt(why: str) -> LLMOptError:
        return LLMOptError(f"imatrix {path} is corrupt ({why}): recompute it (llama-imatrix) or pass a data spec")

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LLMOptError(f"cannot read imatrix {path}: {e.strerror}") from None
    if magic == b"GGUF":
        try:
            reader = gguf.GGUFReader(path)
            tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
        except Exception as e:  # noqa: BLE001 - gguf-py raises anything on a cut or corrupt file
            raise corrupt(f"unreadable GGUF: {str(e).splitlines()[0][:100] if str(e) else type(e).__name__}") from e
        out = {}
        for key, sums in tensors.items():
            if key.endswith(".in_sum2"):
                name = key.removesuffix(".in_sum2")
                counts = tensors.get(name + ".counts")
                if counts is None:
                    raise LLMOptError(f"imatrix {path}: {key} has no matching .counts tensor")
                if not counts.size or sums.size % counts.size:
                    raise corrupt(f"{key} does not fit its .counts")
                sums = sums.reshape(counts.size, -1)
                c = counts.reshape(-1, 1)
                out[name] = np.where(c > 0, sums / np.where(c > 0, c, 1), 1.0).reshape(-1).astype(np.float32)
        return out
    try:  # legacy: n; per entry: len, name, ncall, nval, float[nval] (= mean · ncall)
        raw = path.read_bytes()
        at, out = 4, {}
        n = int(np.frombuffer(raw, np.int32, 1, 0)[0])
        if not 0 < n < 1_000_000:
            raise ValueError(f"{n} entries")
        for _ in range(n):
            ln = int(np.frombuffer(raw, np.int32, 1, at)[0])
            if not 0 < ln <= 4096 or at + 4 + ln > len(raw):
                raise ValueError("bad name length")
            name = raw[at + 4 : at + 4 + ln].decode()
            at += 4 + ln
            ncall, nval = (int(x) for x in np.frombuffer(raw, np.int32, 2, at))
            if ncall < 0 or nval <= 0:
                raise ValueError("bad entry size")
            vals = np.frombuffer(raw, np.float32, nval, at + 8).copy()
            at += 8 + 4 * nval
            out[name] = vals / ncall if ncall > 0 else vals
        return out
    except (ValueError, UnicodeDecodeError, IndexError) as e:
        raise LLMOptError(f"{path} is neither a GGUF imatrix nor a legacy llama.cpp .dat imatrix") from e
