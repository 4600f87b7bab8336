"""Run the ``llmopt`` command and hold it at one point of its run, so a test can signal it exactly there.

    python -m tests.interrupt_point MARKER WHEN ARGS...

``WHEN`` is ``EVENT:TEXT``, the first Python audit event ``EVENT`` one of whose arguments contains ``TEXT``
(``import:numpy`` while torch imports it, ``open:config.json`` while the model loads, ``os.rename:.out.tmp-``
as the output is renamed into place), ``call:MODULE:CLASS.METHOD``, the first call of that method, or
``exit``, once the command has returned (the interpreter's exit). There the process creates ``MARKER``
and waits until the test has sent its signal and removed ``MARKER`` (60 s at most): a signal handler
that raises does so while it waits, as it would at that point of a real run. Then ``ARGS`` run as
``python -m llmopt.cli ARGS`` would run them.
"""

from __future__ import annotations

import atexit
import importlib
import runpy
import sys
import time
from pathlib import Path


def _hold(marker: Path) -> None:
    marker.touch()
    t0 = time.monotonic()
    while marker.exists() and time.monotonic() - t0 < 60:
        time.sleep(0.005)


def _at_event(marker: Path, event: str, text: str) -> None:
    fired = []

    def hook(name: str, args: tuple) -> None:
        if name == event and not fired and any(text in str(a) for a in args):
            fired.append(True)
            _hold(marker)

    sys.addaudithook(hook)


def _at_call(marker: Path, module: str, qualname: str) -> None:
    cls_name, method = qualname.split(".")
    cls = getattr(importlib.import_module(module), cls_name)
    original = getattr(cls, method)

    def held(*args, **kwargs):
        setattr(cls, method, original)
        _hold(marker)
        return original(*args, **kwargs)

    setattr(cls, method, held)


def main() -> None:
    marker, when, *argv = sys.argv[1:]
    marker_path = Path(marker)
    kind, _, rest = when.partition(":")
    if kind == "call":
        _at_call(marker_path, *rest.split(":"))
    elif kind == "exit":
        atexit.register(_hold, marker_path)  # registered first: runs after every later atexit function
    else:
        _at_event(marker_path, kind, rest)
    sys.argv = ["llmopt", *argv]
    runpy.run_module("llmopt.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
