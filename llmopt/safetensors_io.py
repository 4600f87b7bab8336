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
    path: str | Path, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]
) -> None:
    """``entries``: (name, shape, dtype, make) per tensor; ``make()`` is called once, in order, when its
    bytes are written, and must return a tensor of exactly that shape and dtype."""
    header, offset = {}, 0
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
