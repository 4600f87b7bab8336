"""Evaluation backends: anything that turns a window of token ids into logits and can time generation.

The metric code (``llmopt.metrics``) only sees :class:`Backend`; later backends (llama.cpp, ONNX Runtime)
plug in here without touching it.
"""

from llmopt.backends.base import Backend, SpeedResult, default_threads, resolve_threads

__all__ = ["Backend", "SpeedResult", "backend_kind", "default_threads", "make_backend", "resolve_threads"]


def make_backend(kind: str, model_spec: str, *, threads: int | None = None, **kw) -> Backend:
    """Build a backend by name. ``kind`` 'auto' picks from the spec (``.gguf`` files → llama.cpp when
    available, everything else → torch). ``threads`` None means :func:`default_threads` (physical
    cores), the same for every backend; a value below 1 is a one-line LLMOptError."""
    from llmopt.errors import LLMOptError

    threads = resolve_threads(threads)
    kind = backend_kind(kind, model_spec)
    if kind == "torch":
        from llmopt.backends.torch_backend import TorchBackend

        return TorchBackend.from_spec(model_spec, threads=threads, **kw)
    if kind == "gguf":
        return _gguf_backend(model_spec, threads=threads, **kw)
    if kind == "onnx":  # ONNX Runtime on an ONNX folder (llmopt export --to onnx)
        from llmopt.backends.onnx_backend import OnnxBackend

        return OnnxBackend.from_spec(model_spec, threads=threads, **kw)
    raise LLMOptError(f"unknown backend '{kind}'; valid backends: torch, gguf, onnx")


def backend_kind(kind: str, model_spec: str) -> str:
    """``kind`` with 'auto' resolved from the spec: ``.gguf`` → gguf, a folder with ``model.onnx`` → onnx,
    anything else → torch. Other values are returned as given (``make_backend`` validates them)."""
    if kind != "auto":
        return kind
    if model_spec.strip().lower().endswith(".gguf"):
        return "gguf"
    return "onnx" if _is_onnx_folder(model_spec) else "torch"


def _is_onnx_folder(model_spec: str) -> bool:
    """A local folder holding ``model.onnx`` (checked without importing onnxruntime)."""
    from pathlib import Path

    p = Path(model_spec.strip()).expanduser()
    return p.is_dir() and (p / "model.onnx").is_file()


def _gguf_backend(model_spec: str, *, threads: int | None = None, **kw) -> Backend:
    """llama.cpp through llama-cpp-python, for a .gguf file (or ``bundled:<name>``)."""
    from llmopt.backends.llamacpp_backend import LlamaCppBackend

    return LlamaCppBackend.from_spec(model_spec, threads=threads, **kw)
