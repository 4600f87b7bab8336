"""Writing outputs safely: the one place every llmopt output (compressed folder, GGUF file, ONNX folder,
``--json`` file, model card) goes through, in words for the command line.

* :func:`preflight` checks, before any model is loaded, that an output can be written: not the current
  folder or one of its ancestors, no existing output unless ``overwrite``, the right kind (file or
  folder), a parent that is a folder (or can be created) and is writable — tested by creating and
  removing a probe entry, so read-only, immutable and full file systems are caught, root or not.
* :func:`atomic_output` is :func:`llmopt.atomic.atomic_write` (a temporary sibling ``.{name}.tmp-{pid}``,
  fsynced and renamed onto the output only when the block succeeds; on any error, SIGINT or SIGTERM it
  is removed and an existing output stays byte-identical; renames with SIGINT/SIGTERM deferred) whose
  failures are one-line :class:`LLMOptError` messages naming the option (``--output``, ``--json``).
* Stale siblings (``.{name}.tmp-{pid}*`` / ``.{name}.old-{pid}*``) of processes that no longer run — a
  SIGKILL, a power cut — are removed by the next run to the same output.
* :func:`install_signal_handlers` turns SIGINT and SIGTERM into :class:`Interrupted` (a
  ``KeyboardInterrupt``), so ``finally`` blocks clean up on SIGTERM as they do on Ctrl-C; one that arrives
  during an import acts once the import is done (import-time code of compiled libraries drops it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from llmopt.atomic import (
    Interrupted,
    TargetExists,
    atomic_write,
    install_signal_handlers,
    remove,
    remove_stale,
    siblings,
    signal_raised,
    signals_deferred,
    temp_sibling,
)
from llmopt.errors import LLMOptError

__all__ = [
    "Interrupted",
    "signal_raised",
    "atomic_output",
    "install_signal_handlers",
    "preflight",
    "remove_stale",
    "siblings",
    "signals_deferred",
    "temp_sibling",
    "write_text",
]


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def preflight(
    output: str | Path, *, overwrite: bool, kind: str = "folder", flag: str = "--output", suffix: str | None = None
) -> Path:
    """Check that ``output`` (a ``folder`` or a ``file``) can be written; return it as a Path.

    One-line LLMOptError otherwise. Nothing is created (the probe entry is removed again)."""
    text = str(output)
    if not text.strip():
        raise LLMOptError(f"{flag} is empty: give a path")
    out = Path(text).expanduser()
    absolute = Path(os.path.abspath(out))
    cwd = Path.cwd()
    if absolute == absolute.parent or absolute == cwd or absolute in cwd.parents or out.name in ("", ".", ".."):
        raise LLMOptError(f"{flag} {text} is the current folder or one above it: give a new path, e.g. out/model")
    if suffix is not None and out.suffix.lower() != suffix:
        raise LLMOptError(f"{flag} {text} must end in {suffix}")
    if out.exists() or out.is_symlink():
        if kind == "folder" and not out.is_dir():
            raise LLMOptError(f"{flag} {text} exists and is a file, not a folder: choose another path")
        if kind == "file" and out.is_dir():
            raise LLMOptError(f"{flag} {text} is a folder: give a file name")
        if not overwrite:
            raise LLMOptError(f"{flag} {text} already exists; pass --overwrite to replace it")
    parent = absolute.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LLMOptError(f"cannot write {flag} {text}: {existing} is a file, not a folder")
    probe = existing / f".{out.name}.tmp-{os.getpid()}.probe"
    try:
        try:
            probe.mkdir()
        finally:  # also when Ctrl-C lands between the two calls: the probe never outlives this check
            with contextlib.suppress(OSError):
                probe.rmdir()
    except FileExistsError:
        remove(probe)
    except OSError as e:
        raise LLMOptError(f"cannot write {flag} {text}: {existing} is not writable ({_reason(e)})") from None
    if existing == parent:
        remove_stale(absolute)
    return out


def _mkdir_parent(output: Path, flag: str) -> None:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LLMOptError(f"cannot create the folder of {flag} {output}: {_reason(e)}") from None


@contextlib.contextmanager
def atomic_output(
    output: str | Path, *, overwrite: bool, kind: str = "folder", flag: str = "--output"
) -> Iterator[Path]:
    """Yield a temporary sibling path (a created folder for ``folder``, a free path for ``file``);
    when the block succeeds it replaces ``output``, else it is removed and ``output`` is untouched.
    Entries named after the sibling plus a suffix (``.{name}.tmp-{pid}.f32``) are removed with it."""
    output = Path(output)
    _mkdir_parent(output, flag)
    tmp = temp_sibling(output)
    try:
        try:
            with atomic_write(output, kind=kind, overwrite=overwrite) as tmp:
                try:
                    yield tmp
                except OSError as e:  # disk full, permissions changed meanwhile, ...
                    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
                    raise LLMOptError(f"cannot write {flag} {output}: {_reason(e)}{where}") from e
        except TargetExists:
            raise LLMOptError(f"{flag} {output} appeared while this run was writing it; pass --overwrite") from None
        except OSError as e:  # creating the temporary sibling, flushing or renaming it
            raise LLMOptError(f"cannot write {flag} {output}: {_reason(e)}") from None
    finally:
        with signals_deferred():
            for p in siblings(output):
                if p.name.startswith(tmp.name + "."):
                    remove(p)


def write_text(output: str | Path, text: str, *, flag: str = "--output", overwrite: bool = True) -> None:
    """Write a small text file atomically (temp sibling + fsync + rename)."""
    with atomic_output(output, overwrite=overwrite, kind="file", flag=flag) as tmp:
        try:
            tmp.write_text(text, encoding="utf-8")
        except OSError as e:
            raise LLMOptError(f"cannot write {flag} {output}: {_reason(e)}") from None
