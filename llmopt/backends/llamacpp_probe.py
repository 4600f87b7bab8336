"""Whether llama.cpp's extra CPU buffer types (AMX, repacked weights) run on this machine.

llama-cpp-python builds llama.cpp with ``-march=native``; on a CPU that reports AMX, llama.cpp repacks the
weights into AMX buffers, and on some machines its AMX matmul then segfaults on the first decode
(ggml-org/llama.cpp#20824, machine-dependent, not fixed upstream). A segfault kills the Python process, so
it cannot be caught: when the library was built with AMX, one short child process loads the file and
decodes two tokens first; if the child dies, the file is loaded without the extra buffer types (llama.cpp's
``use_extra_bufts = false``, its ``--no-extra-bufts``): the same results, slower. Without AMX nothing is
probed and llama.cpp runs as it always does.

Where the AMX buffers crash, the repacked Q4_0 weights (llama.cpp's ``CPU_REPACK`` buffer, about twice the
decode speed of the plain layout) are asked for by name instead (:mod:`llmopt.backends.llamacpp_repack`),
after a second child probe with them; only if that crashes too do the weights stay plain.

``LLMOPT_LLAMACPP_EXTRA_BUFFERS=0`` / ``=1`` / ``=repack`` skips the probes and forces the choice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "LLMOPT_LLAMACPP_EXTRA_BUFFERS"
NO_AMX_BUILD = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON '
    '-DGGML_AVX512_VNNI=ON" pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python'
)
# The child: what LlamaCppBackend does first (load, a short prompt, one decode step), nothing else.
PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, n_threads=1, verbose=False)
llm.eval([1, 2, 3, 4])
llm.eval([5])
"""
_verdicts: dict[tuple[str, str, int, int], bool] = {}


def amx_compiled() -> bool:
    """True when the installed llama.cpp was built with AMX kernels (its system info says AMX_INT8 = 1)."""
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


def extra_buffers_work(path: Path, probe: str = PROBE) -> bool:
    """Whether llama.cpp may use its extra buffer types for the GGUF ``path`` (see the module docstring).

    One probe per file (size and mtime) and process; only when AMX is compiled in."""
    forced = os.environ.get(ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if not amx_compiled():
        return True
    key = _key(path, "extra")
    if key not in _verdicts:
        ok = _child_runs(probe, path)
        if not ok:
            log.warning(
                "llama.cpp's AMX kernels crash on this machine (ggml-org/llama.cpp#20824); loading %s without "
                "its AMX buffers (same results; its repacked Q4_0 weights kept where they run, else slower). "
                "For full speed build llama-cpp-python without AMX: %s",
                path.name,
                NO_AMX_BUILD,
            )
        _verdicts[key] = ok
    return _verdicts[key]


def _key(path: Path, what: str) -> tuple[str, str, int, int]:
    """One verdict per file (path, size, mtime), kind of probe and process."""
    st = path.stat()
    return (str(path.resolve()), what, st.st_size, st.st_mtime_ns)


def _child_runs(probe: str, path: Path) -> bool:
    """Whether a child running ``probe`` on ``path`` exits cleanly (a segfault or a hang: no)."""
    try:
        cmd = [sys.executable, "-c", probe, str(path)]
        return subprocess.run(cmd, capture_output=True, timeout=300, stdin=subprocess.DEVNULL).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def repack_works(path: Path, probe: str | None = None) -> bool:
    """Where the AMX buffers crash: whether llama.cpp runs ``path`` with its repacked Q4_0 weights asked for
    by name (:mod:`llmopt.backends.llamacpp_repack`), probed in a child as the AMX buffers are. False where
    the file has no tensor the repack takes or the build has no ``CPU_REPACK`` buffer type."""
    from llmopt.backends.llamacpp_repack import repack_buffer_type, repackable_tensors

    key = _key(path, "repack")
    if key not in _verdicts:
        ok = bool(repackable_tensors(path)) and repack_buffer_type() is not None
        _verdicts[key] = ok and _child_runs(probe or PROBE_REPACK, path)
    return _verdicts[key]


# The repack probe: the same steps with the repacked weights asked for by name (and no AMX buffers).
PROBE_REPACK = """
import sys
from llmopt.backends.llamacpp_probe import open_with
llm = open_with("repack", sys.argv[1], n_ctx=64, n_batch=64, n_threads=1, verbose=False)
llm.eval([1, 2, 3, 4])
llm.eval([5])
"""


def buffer_mode(path: Path) -> str:
    """How llama.cpp holds the weights of ``path`` here: ``extra`` (its extra buffer types, the default),
    ``repack`` (AMX crashes: the repacked Q4_0 weights only) or ``plain`` (neither). ``LLMOPT_LLAMACPP_EXTRA_BUFFERS``
    = ``1`` / ``0`` / ``repack`` forces one."""
    forced = os.environ.get(ENV)
    if forced in ("0", "1", "repack"):
        return {"0": "plain", "1": "extra"}.get(forced, forced)
    if extra_buffers_work(path):
        return "extra"
    return "repack" if repack_works(path) else "plain"


@contextlib.contextmanager
def model_params(mode: str, path: str | Path | None = None) -> Iterator[None]:
    """While active, ``llama_cpp.Llama(...)`` builds its model parameters for the :func:`buffer_mode` ``mode``
    (llama-cpp-python does not expose ``use_extra_bufts`` or the tensor overrides; it reads
    ``llama_model_default_params()`` at construction). ``repack`` needs the GGUF ``path``."""
    import llama_cpp.llama_cpp as lib

    if mode == "extra":
        yield
        return
    overrides = None
    if mode == "repack":
        from llmopt.backends.llamacpp_repack import Overrides, repack_buffer_type, repackable_tensors

        overrides = Overrides(repackable_tensors(Path(path)), repack_buffer_type())  # alive until the load ends
    default = lib.llama_model_default_params

    def without_extra_bufts():
        p = default()
        p.use_extra_bufts = False
        if overrides is not None:
            p.tensor_buft_overrides = overrides.address
        return p

    lib.llama_model_default_params = without_extra_bufts
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def open_llama(path: str | Path, **kwargs):
    """``llama_cpp.Llama(model_path=path, **kwargs)``, without the AMX buffers where they crash (the repacked
    Q4_0 weights kept where they run, :func:`buffer_mode`); the mode is left on the object as ``llmopt_buffers``.

    Everything that decodes with llama.cpp in-process (the backend, tests, scripts) opens files through
    this, so a machine where AMX crashes falls back instead of killing the process."""
    return open_with(buffer_mode(Path(path)), path, **kwargs)


def open_with(mode: str, path: str | Path, **kwargs):
    """``llama_cpp.Llama(model_path=path, **kwargs)`` in the :func:`buffer_mode` ``mode`` given, unprobed
    (the probes' children and tests; everything else goes through :func:`open_llama`)."""
    import llama_cpp

    with model_params(mode, path):
        llm = llama_cpp.Llama(model_path=str(path), **kwargs)
    llm.llmopt_buffers = mode
    return llm
