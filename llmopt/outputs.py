"""Writing outputs safely: the one place every llmopt output (compressed folder, GGUF file, ONNX folder,
``--json`` file, cached GGUF conversion) goes through.

* :func:`preflight` checks, before any model is loaded, that an output can be written: not the current
  folder or one of its ancestors, no existing output unless ``overwrite``, the right kind (file or
  folder), a parent that is a folder (or can be created) and is writable — tested by creating and
  removing a probe entry, so read-only, immutable and full file systems are caught, root or not.
* :func:`atomic_output` yields a temporary sibling ``.{name}.tmp-{pid}`` that replaces the output only
  when the block succeeds; on any error, SIGINT or SIGTERM it is removed and an existing output stays
  byte-identical. Renames run with SIGINT/SIGTERM deferred.
* Stale siblings (``.{name}.tmp-{pid}*`` / ``.{name}.old-{pid}*``) of processes that no longer run — a
  SIGKILL, a power cut — are removed by the next run to the same output.
* :func:`install_signal_handlers` turns SIGTERM into :class:`Interrupted` (a ``KeyboardInterrupt``), so
  ``finally`` blocks clean up on SIGTERM as they do on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from llmopt.errors import LLMOptError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) received; raised where the program was, so cleanup runs."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGTERM → :class:`Interrupted` in the main thread (SIGINT already raises KeyboardInterrupt)."""
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _raise_interrupted)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends (renames and cleanup are never cut in half)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier call in this process: nobody is writing it now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def temp_sibling(output: Path, tag: str = "tmp") -> Path:
    """``.{name}.{tag}-{pid}`` next to ``output``; ``tag`` is ``tmp`` or ``old`` (plus a suffix)."""
    return output.parent / f".{output.name}.{tag}-{os.getpid()}"


def siblings(output: Path) -> list[Path]:
    """Every temp sibling of ``output``, of any process."""
    pat = re.compile(rf"^\.{re.escape(output.name)}\.(tmp|old)-(\d+)(\..*)?$")
    try:
        return [p for p in output.parent.iterdir() if pat.match(p.name)]
    except OSError:
        return []


def remove_stale(output: Path) -> list[Path]:
    """Remove the temp siblings of ``output`` whose process is gone; returns what was removed."""
    pat = re.compile(rf"^\.{re.escape(output.name)}\.(tmp|old)-(\d+)(\..*)?$")
    removed = []
    for p in siblings(output):
        m = pat.match(p.name)
        if m and not _pid_alive(int(m.group(2))):
            _remove(p)
            removed.append(p)
    return removed


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


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
        probe.mkdir()
        probe.rmdir()
    except FileExistsError:
        _remove(probe)
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
    when the block succeeds it replaces ``output``, else it is removed and ``output`` is untouched."""
    output = Path(output)
    _mkdir_parent(output, flag)
    remove_stale(output)
    tmp = temp_sibling(output)
    _remove(tmp)
    try:
        if kind == "folder":
            tmp.mkdir()
    except OSError as e:
        raise LLMOptError(f"cannot write {flag} {output}: {_reason(e)}") from None
    install_signal_handlers()
    try:
        try:
            yield tmp
        except OSError as e:  # disk full, permissions changed meanwhile, ...
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise LLMOptError(f"cannot write {flag} {output}: {_reason(e)}{where}") from e
        with signals_deferred():
            commit(tmp, output, overwrite=overwrite, flag=flag)
    finally:
        with signals_deferred():
            for p in [tmp, *(s for s in siblings(output) if s.name.startswith(tmp.name + "."))]:
                _remove(p)


def commit(tmp: Path, output: Path, *, overwrite: bool, flag: str = "--output") -> None:
    """Rename ``tmp`` onto ``output`` (an existing output is moved aside first and removed after)."""
    try:
        if output.exists() or output.is_symlink():
            if not overwrite:
                raise LLMOptError(f"{flag} {output} appeared while this run was writing it; pass --overwrite")
            if output.is_dir() and not output.is_symlink():
                old = temp_sibling(output, "old")
                _remove(old)
                output.rename(old)
                try:
                    tmp.rename(output)
                except OSError:
                    old.rename(output)  # put the previous output back
                    raise
                _remove(old)
                return
        os.replace(tmp, output)
    except OSError as e:
        raise LLMOptError(f"cannot write {flag} {output}: {_reason(e)}") from None


def write_text(output: str | Path, text: str, *, flag: str = "--output", overwrite: bool = True) -> None:
    """Write a small text file atomically (temp sibling + rename)."""
    with atomic_output(output, overwrite=overwrite, kind="file", flag=flag) as tmp:
        try:
            tmp.write_text(text, encoding="utf-8")
        except OSError as e:
            raise LLMOptError(f"cannot write {flag} {output}: {_reason(e)}") from None
