"""The one atomic writer (llmopt.atomic): write beside, fsync, rename; cleanup on error and interrupt."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from llmopt import atomic


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_file_and_folder_replace_their_target(tmp_path):
    f = tmp_path / "a.txt"
    atomic.write_text(f, "one")
    atomic.write_text(f, "two")
    assert f.read_text() == "two"
    d = tmp_path / "d"
    for text in ("first", "second"):
        with atomic.atomic_write(d, kind="folder") as tmp:
            assert tmp.is_dir() and tmp.name == f".d.tmp-{os.getpid()}"
            (tmp / "x").write_text(text)
    assert (d / "x").read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]


@pytest.mark.parametrize("kind", ["file", "folder"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, atomic.Interrupted])
def test_failure_leaves_the_target_byte_identical(tmp_path, kind, error):
    target = tmp_path / "out"
    if kind == "file":
        target.write_bytes(b"old")
    else:
        target.mkdir()
        (target / "w").write_bytes(b"old")
    with pytest.raises(error):
        with atomic.atomic_write(target, kind=kind) as tmp:
            (tmp if kind == "file" else tmp / "w").write_bytes(b"new")
            raise error()
    assert (target if kind == "file" else target / "w").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_no_overwrite_refuses_an_existing_target(tmp_path):
    target = tmp_path / "t"
    target.write_text("theirs")
    with pytest.raises(atomic.TargetExists):
        atomic.write_text(target, "mine", overwrite=False)
    assert target.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["t"]


def test_stale_siblings_of_dead_processes_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = [tmp_path / f".m.gguf.tmp-{dead}", tmp_path / f".m.gguf.old-{dead}", tmp_path / f".m.gguf.tmp-{dead}.f32"]
    for p in stale:
        p.write_bytes(b"x")
    (tmp_path / f".other.tmp-{dead}").mkdir()
    live = tmp_path / f".m.gguf.tmp-{alive}"
    live.write_bytes(b"x")
    atomic.write_bytes(tmp_path / "m.gguf", b"gguf")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["m.gguf", live.name, f".other.tmp-{dead}"])
    assert atomic.remove_stale_in(tmp_path) == [tmp_path / f".other.tmp-{dead}"]


@pytest.fixture
def own_handlers():
    """Python's default handlers for the test, then llmopt's installed; the previous ones put back after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    atomic.install_signal_handlers()
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _wait(seconds: float) -> None:
    for _ in range(int(seconds / 0.005)):
        time.sleep(0.005)  # a signal handler runs in here


def test_signals_deferred_holds_a_signal_another_thread_receives(own_handlers):
    """Blocking the signals in the main thread deferred nothing: the kernel gives a process signal to a
    thread that does not block it (torch's, the RSS sampler) and CPython runs the handler in the main
    thread at once, inside the block."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    reached = False
    try:
        with pytest.raises(atomic.Interrupted) as e:
            with atomic.signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                _wait(0.2)
                reached = True
    finally:
        stop.set()
        other.join()
    assert reached and e.value.signum == signal.SIGTERM


def test_a_signal_during_an_import_acts_once_the_import_is_done(tmp_path, monkeypatch, own_handlers):
    """Like torch, whose start-up imports numpy and clears any error of that import: a KeyboardInterrupt
    raised inside the import was dropped there, and the program went on."""
    (tmp_path / "swallower.py").write_text(
        "try:\n    import signalled\nexcept BaseException:\n    swallowed = True\nelse:\n    swallowed = False\n"
    )
    (tmp_path / "signalled.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\nfor _ in range(20):\n    time.sleep(0.005)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("swallower", "signalled"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(atomic.Interrupted):
        importlib.import_module("swallower")
        _wait(2)  # the held signal comes back ~10 ms after the import
    assert sys.modules["swallower"].swallowed is False and "signalled" in sys.modules


def test_an_interrupt_that_c_code_replaced_still_exits_as_the_signal(monkeypatch, own_handlers):
    """numpy's ``ndarray.tofile`` into gguf-py's file, interrupted by SIGTERM, surfaced a ``TypeError``
    (found by test_interruption[export-15-writing]: exit 1, "internal error"); it is the interrupt: 143."""
    import argparse

    import llmopt.cli as cli

    monkeypatch.setattr(atomic, "_raised", [])

    def command(args) -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            _wait(1.0)
        except atomic.Interrupted:
            raise TypeError("expected str, bytes or os.PathLike object, not BufferedWriter") from None
        return 0

    class Parser:
        func = staticmethod(command)

        def parse_args(self, argv):
            return argparse.Namespace(verbose=False, func=self.func)

    monkeypatch.setattr(cli, "build_parser", Parser)
    assert cli._run([], debug=False) == 128 + signal.SIGTERM
    monkeypatch.setattr(atomic, "_raised", [])

    def buggy(args) -> int:
        raise TypeError("a bug")

    monkeypatch.setattr(Parser, "func", staticmethod(buggy))
    assert cli._run([], debug=False) == 1  # no signal: still a bug
    atomic._raised.append(signal.SIGTERM)  # one raised in an earlier run of this process (in-process tests)
    atomic.install_signal_handlers()  # a new run forgets it
    assert cli._run([], debug=False) == 1  # no signal: still a bug
