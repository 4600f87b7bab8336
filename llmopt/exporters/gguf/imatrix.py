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
    spec: str, model: Any, tokenizer: Any, arch: gguf.MODEL_ARCH, samples: int, seq_len: int
) -> dict[str, np.ndarray]:
    """GGUF tensor name → (in,) float32 mean x², from an imatrix file or computed on data ``spec``."""
    path = Path(spec).expanduser()
    if path.is_file():
        data = read_imatrix_file(path)
    else:
        data = compute_imatrix(model, tokenizer, spec, samples, seq_len, arch)
    if not data:
        raise LLMOptError(f"importance matrix {spec} has no entries")
    return data


def compute_imatrix(
    model: Any,
    tokenizer: Any,
    data: str,
    samples: int = 32,
    seq_len: int = 512,
    arch: gguf.MODEL_ARCH | None = None,
) -> dict[str, np.ndarray]:
    """llama.cpp's importance matrix on ``data``: per decoder Linear, mean over tokens of x_j² for each
    input column j (``tools/imatrix``: in_sum2 / count), keyed by GGUF tensor name."""
    from llmopt.calibration import layer_statistics
    from llmopt.data import calibration_windows

    if arch is None:
        from llmopt.exporters.gguf.hparams import arch_of

        arch = arch_of(getattr(model.config, "model_type", None)).arch
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


def read_imatrix_file(path: Path) -> dict[str, np.ndarray]:
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
