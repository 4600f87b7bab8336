"""Evaluation backends: anything that turns a window of token ids into logits and can time generation.

The metric code (``llmopt.metrics``) only sees :class:`Backend`; later backends (llama.cpp, ONNX Runtime)
plug in here without touching it.
"""

from llmopt.backends.base import Backend, SpeedResult

__all__ = ["Backend", "SpeedResult", "make_backend"]


def make_backend(kind: str, model_spec: str, *, threads: int | None = None, **kw) -> Backend:
    """Build a backend by name. ``kind`` 'auto' picks from the spec (``.gguf`` files → llama.cpp when
    available, everything else → torch)."""
    from llmopt.errors import LLMOptError

    if kind == "auto":
        kind = "gguf" if model_spec.strip().lower().endswith(".gguf") else "torch"
    if kind == "torch":
        from llmopt.backends.torch_backend import TorchBackend

        return TorchBackend.from_spec(model_spec, threads=threads, **kw)
    if kind == "gguf":
        return _gguf_backend(model_spec, threads=threads, **kw)
    raise LLMOptError(f"unknown backend '{kind}'; valid backends: torch, gguf")


def _gguf_backend(model_spec: str, *, threads: int | None = None, **kw) -> Backend:
    """llama.cpp through llama-cpp-python, for a .gguf file (or ``bundled:<name>``)."""
    from llmopt.backends.llamacpp_backend import LlamaCppBackend

    return LlamaCppBackend.from_spec(model_spec, threads=threads, **kw)
