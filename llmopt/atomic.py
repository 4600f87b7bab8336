"""Atomic writes, the one way llmopt replaces a file or folder on disk: write beside, fsync, rename.

:func:`atomic_write` yields a temporary sibling ``.{name}.tmp-{pid}`` of the target (a free path for a
``file``, a created empty folder for a ``folder``). When the block succeeds the sibling's contents are
fsynced (every file and folder in it), it is renamed onto the target and the parent folder is fsynced;
on any error, SIGINT or SIGTERM it is removed and an existing target stays byte-identical. The rename
and the cleanup run with SIGINT/SIGTERM deferred (:func:`signals_deferred`), so neither is cut in half:
a rename that has begun is completed and the interrupt acts right after it, so the target is then the
complete new one. An existing folder target is moved aside (``.{name}.old-{pid}``), replaced, and
removed after; an existing file is replaced by one ``os.replace``.

Stale siblings (``.{name}.tmp-{pid}*`` / ``.{name}.old-{pid}*``) of processes that no longer run — a
SIGKILL, a power cut — are removed by the next write to the same target (:func:`remove_stale`), or of
every target in a folder (:func:`remove_stale_in`).

:func:`install_signal_handlers` turns SIGINT and SIGTERM into :class:`Interrupted` (a
``KeyboardInterrupt``), so ``finally`` blocks clean up on SIGTERM as they do on Ctrl-C, and holds one
that arrives while a module is being imported until that import is done: import-time code of compiled
libraries drops exceptions it does not expect (torch's start-up imports numpy and clears any error of
that import, a ``KeyboardInterrupt`` included, so a Ctrl-C there was lost and the run went on), and a
half-imported extension module cannot be imported again. Signals that arrive meanwhile add nothing; a
run is thus stopped at most one import later (torch's and transformers' take seconds).

Failures are raised as they come (``OSError``; :class:`TargetExists` when the target appeared and
``overwrite`` is off): callers word them for their users (:mod:`llmopt.outputs`). This module imports
only the standard library.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SIBLING = r"^\.{name}\.(tmp|old)-(\d+)(\..*)?$"


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) received; raised where the program was, so cleanup runs."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class TargetExists(FileExistsError):
    """The target of an :func:`atomic_write` with ``overwrite=False`` exists (it appeared meanwhile)."""


def _imports_on(frame) -> int:
    """How many imports are under way in the stack that ``frame`` tops."""
    n = 0
    while frame is not None:
        code = frame.f_code
        n += code.co_name == "_find_and_load" and code.co_filename.startswith("<frozen importlib._bootstrap")
        frame = frame.f_back
    return n


_outer_imports = 0  # imports under way where the handlers were installed (a program run by an import)
_held: list[int] = []  # the signal waiting for an import to end
_raised: list[int] = []  # the signals raised as Interrupted in this process


def signal_raised() -> int | None:
    """The signal last raised as :class:`Interrupted`, if any. C code running a Python call when the
    handler raised may replace the exception with its own (numpy's ``ndarray.tofile`` into gguf-py's
    file reports a ``TypeError``), so the CLI asks this before calling an exception a bug."""
    return _raised[-1] if _raised else None


def _on_signal(signum, frame):  # the SIGINT / SIGTERM handler (runs in the main thread)
    if _held:  # one is held already: it acts once the import is done
        return
    if _imports_on(frame if frame is not None else sys._getframe(1)) > _outer_imports:
        _held.append(signum)
        try:
            threading.Thread(target=_redeliver, args=(signum,), name="llmopt-held-signal", daemon=True).start()
            return
        except RuntimeError:  # no thread to wait with: act now
            _held.clear()
    _raised.append(signum)
    raise Interrupted(signum)


def _redeliver(signum: int) -> None:
    """Send ``signum`` again to the main thread once its imports are done (polled every 10 ms)."""
    main = threading.main_thread()
    while main.is_alive():
        time.sleep(0.01)
        frame = sys._current_frames().get(main.ident)
        if frame is None or _imports_on(frame) <= _outer_imports:
            break
    _held.clear()
    if main.is_alive():  # to the main thread, so that a call it is in returns (EINTR) and the handler runs
        if hasattr(signal, "pthread_kill"):
            signal.pthread_kill(main.ident, signum)
        else:
            os.kill(os.getpid(), signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM → :class:`Interrupted` in the main thread, held while an import runs.

    Leaves alone a signal that is ignored (a background job's SIGINT) or has a handler of its own. Called
    at the start of each CLI run: no signal has been raised in this run yet (:func:`signal_raised`)."""
    global _outer_imports
    _raised.clear()
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) in (default, None):
            _outer_imports = _imports_on(sys._getframe(1))
            signal.signal(signum, _on_signal)


def _deliver(signum: int, handler) -> None:
    """Act on ``signum`` as ``handler`` (what :func:`signal.getsignal` returned) would have."""
    if callable(handler):
        handler(signum, sys._getframe(1))
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends (renames and cleanup are never cut in half), then act on the
    first that arrived as the handler in place before the block would have (raise :class:`Interrupted`).

    The handlers are swapped, not the signal mask: CPython runs a Python handler in the main thread
    whichever thread the kernel gives the signal to, and a run has threads that do not block it (the RSS
    sampler, libraries' workers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum, frame):  # noqa: ARG001 - signal handler signature
        if not pending:
            pending.append(signum)

    previous = {}
    for signum in _SIGNALS:
        handler = signal.getsignal(signum)
        if handler not in (signal.SIG_IGN, None):
            previous[signum] = handler
            signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            _deliver(pending[0], previous[pending[0]])


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


def temp_sibling(target: Path, tag: str = "tmp") -> Path:
    """``.{name}.{tag}-{pid}`` next to ``target``; ``tag`` is ``tmp`` or ``old``."""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}"


def siblings(target: Path) -> list[Path]:
    """Every temp sibling of ``target``, of any process."""
    pat = re.compile(_SIBLING.format(name=re.escape(target.name)))
    try:
        return [p for p in target.parent.iterdir() if pat.match(p.name)]
    except OSError:
        return []


def _remove_dead(folder: Path, pattern: str) -> list[Path]:
    pat = re.compile(pattern)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    removed = []
    for p in entries:
        m = pat.match(p.name)
        if m and not _pid_alive(int(m.group(2))):
            remove(p)
            removed.append(p)
    return removed


def remove_stale(target: Path) -> list[Path]:
    """Remove the temp siblings of ``target`` whose process is gone; returns what was removed."""
    return _remove_dead(target.parent, _SIBLING.format(name=re.escape(target.name)))


def remove_stale_in(folder: Path) -> list[Path]:
    """Remove the temp siblings of every entry of ``folder`` whose process is gone (one listing)."""
    return _remove_dead(folder, _SIBLING.format(name=".+?"))


def remove(p: Path) -> None:
    """Remove a file, link or folder tree; missing or unremovable is not an error."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the data itself was synced
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush ``path`` to disk: a file, or every file and folder in a folder (links are not followed)."""
    if path.is_symlink() or not path.exists():
        return
    if not path.is_dir():
        _fsync_file(path)
        return
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink() and p.is_file():
                _fsync_file(p)
        _fsync_dir(Path(root))


def replace(tmp: Path, target: Path, *, overwrite: bool = True) -> None:
    """Rename ``tmp`` onto ``target``. An existing folder is moved aside first (put back if the rename
    fails) and removed after; :class:`TargetExists` when ``target`` exists and ``overwrite`` is off."""
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise TargetExists(f"{target} exists")
        if target.is_dir() and not target.is_symlink():
            old = temp_sibling(target, "old")
            remove(old)
            target.rename(old)
            try:
                tmp.rename(target)
            except OSError:
                old.rename(target)  # put the previous target back
                raise
            remove(old)
            return
    os.replace(tmp, target)


@contextlib.contextmanager
def atomic_write(
    target: str | Path, *, kind: str = "file", overwrite: bool = True, clean_stale: bool = True
) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` (a free path for ``file``, a created folder for
    ``folder``); when the block succeeds it is fsynced and renamed onto ``target``, else it is removed
    and ``target`` is untouched. The parent folder must exist. ``clean_stale`` first removes the
    siblings of dead processes (callers writing many files in one folder use :func:`remove_stale_in`
    once instead)."""
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', not {kind!r}")
    target = Path(target)
    if clean_stale:
        remove_stale(target)
    tmp = temp_sibling(target)
    remove(tmp)
    install_signal_handlers()
    try:  # the folder is made inside: a signal right after mkdir still reaches the clean-up below
        if kind == "folder":
            tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        with signals_deferred():
            replace(tmp, target, overwrite=overwrite)
        _fsync_dir(target.parent)
    finally:
        with signals_deferred():
            remove(tmp)


def write_bytes(target: str | Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write a small file atomically (:func:`atomic_write`)."""
    with atomic_write(target, kind="file", overwrite=overwrite) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str, *, overwrite: bool = True) -> None:
    """Write a small UTF-8 text file atomically (:func:`atomic_write`)."""
    write_bytes(target, text.encode("utf-8"), overwrite=overwrite)
