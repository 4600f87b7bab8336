"""llama.cpp's repacked Q4_0 weights without its AMX buffers, for machines where AMX crashes.

With its extra buffer types on, llama.cpp puts each weight in the first one that takes it: on a CPU with AMX
that is the AMX buffer (whose matmul crashes on some machines, :mod:`llmopt.backends.llamacpp_probe`), else
``CPU_REPACK`` (Q4_0 rows interleaved for the AVX2 / AVX-512 kernels, about twice the decode speed of the
plain layout on 2 cores). Turning the extra buffer types off loses both. This asks for ``CPU_REPACK`` by name
instead, through llama.cpp's own per-tensor override (``llama_model_params.tensor_buft_overrides``, what
``llama-cli --override-tensor`` sets), for exactly the tensors its repack takes: the Q4_0 matrices of the
decoder layers, whose rows come in multiples of 8. Everything else stays in plain CPU memory.

llama-cpp-python does not wrap the buffer-type registry; the three ggml calls it needs are looked up in the
ggml libraries it ships and has already loaded (``ggml_backend_dev_by_type``, the CPU backend's
``ggml_backend_dev_get_extra_bufts``, ``ggml_backend_buft_name``).
"""

from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path

REPACKED = {"Q4_0"}  # GGUF types whose x86 repack llama.cpp chooses (its q4_0 8x8 / 4x8 kernels)
ROW_MULTIPLE = 8
MATMUL = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


class _Override(ctypes.Structure):  # struct llama_model_tensor_buft_override
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    base, ggml = ctypes.CDLL(str(lib / "libggml-base.so")), ctypes.CDLL(str(lib / "libggml.so"))
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    return base, ggml


@functools.cache  # the registry's buffer types live as long as the process
def repack_buffer_type() -> int | None:
    """The address of llama.cpp's ``CPU_REPACK`` buffer type, or None where this build has none."""
    try:
        base, ggml = _libs()
    except (OSError, AttributeError, ImportError):
        return None
    dev = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        return None
    fn = base.ggml_backend_reg_get_proc_address(
        base.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts"
    )
    if not fn:
        return None
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    i = 0
    while bufts and bufts[i]:
        if base.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


def repackable_tensors(path: str | Path) -> list[str]:
    """The tensors of the GGUF ``path`` that llama.cpp's CPU repack takes: Q4_0 decoder-layer matrices whose
    row count (the GGUF's second dimension) is a multiple of 8."""
    from gguf import GGUFReader

    out = []
    for t in GGUFReader(str(path)).tensors:
        if t.tensor_type.name in REPACKED and MATMUL.match(t.name) and len(t.shape) == 2:
            if int(t.shape[1]) % ROW_MULTIPLE == 0:
                out.append(t.name)
    return out


class Overrides:
    """A NULL-terminated ``llama_model_tensor_buft_override`` array putting ``names`` in ``buft``; keep the
    object alive while the model loads (llama.cpp reads the patterns then)."""

    def __init__(self, names: list[str], buft: int):
        self.patterns = [f"^{re.escape(n)}$".encode() for n in names]
        self.array = (_Override * (len(names) + 1))()
        for k, p in enumerate(self.patterns):
            self.array[k].pattern, self.array[k].buft = p, buft
        self.array[len(names)].pattern, self.array[len(names)].buft = None, None

    @property
    def address(self) -> int:
        return ctypes.addressof(self.array)
