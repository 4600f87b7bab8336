"""Write a safetensors file one tensor at a time.

``safetensors.torch.save_file`` takes every tensor at once and copies each to ``bytes`` before writing,
so saving N bytes of tensors needs them all in memory plus a copy. The compression state holds codes
compactly (:class:`llmopt.core.state.QuantizedLinear`) and unpacks them only to save; unpacking all
of them at once would add ~2 bytes per weight to the peak memory of every quantization run. This
writer takes the header (names, dtypes, shapes) first and then asks for each tensor's data in turn, so
only one tensor is unpacked at a time. The file is an ordinary safetensors file (8-byte little-endian
header size, JSON header padded with spaces to 8 bytes, raw little-endian data) that
``safetensors.safe_open`` reads (tested).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: str | Path,
    entries: Sequence[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """``entries``: (name, shape, dtype, make) per tensor; ``make()`` is called once, in order, when its
    bytes are written, and must return a tensor of exactly that shape and dtype. ``metadata``: the
    header's ``__metadata__`` (string → string), e.g. ``{"format": "pt"}``."""
    header, offset = ({"__metadata__": dict(metadata)} if metadata else {}), 0
    for name, shape, dtype, _ in entries:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, make in entries:
            t = make().detach().to("cpu").contiguous()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: expected {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


INDEX_FILE = "model.safetensors.index.json"  # transformers' name for a sharded folder's index


class ShardWriter:
    """A model's weights as ``n`` safetensors shards written one at a time, in any order, under transformers'
    names (``model-0000k-of-0000n.safetensors``; ``model.safetensors`` when ``n`` is 1), then
    ``model.safetensors.index.json`` (:meth:`finish`). Each shard carries ``{"format": "pt"}`` metadata, as
    ``save_pretrained`` writes it."""

    def __init__(self, folder: str | Path, n: int):
        self.folder, self.n = Path(folder), n
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def file_name(self, k: int) -> str:
        return "model.safetensors" if self.n == 1 else f"model-{k + 1:05d}-of-{self.n:05d}.safetensors"

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        """Shard ``k`` (0-based): ``tensors`` by name, in that order."""
        name = self.file_name(k)
        entries = [(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in tensors.items()]
        write_safetensors(self.folder / name, entries, metadata={"format": "pt"})
        for n, t in tensors.items():
            self.weight_map[n] = name
            self.total_size += t.numel() * t.element_size()

    def finish(self, total_parameters: int) -> None:
        """The index (sharded output only), with the metadata ``save_pretrained`` writes."""
        if self.n == 1:
            return
        index = {
            "metadata": {"total_parameters": total_parameters, "total_size": self.total_size},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
