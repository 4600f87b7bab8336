"""Command line: ``llmopt eval``, ``llmopt compress``, ``llmopt export``, ``llmopt push``, ``llmopt harness``,
``llmopt report``, ``llmopt recipes``.

Each command is a few lines over the Python API. The jobs live in submodules: :mod:`~llmopt.cli.parser`
(the arguments), :mod:`~llmopt.cli.commands` (the command bodies), :mod:`~llmopt.cli.output` (what they
print and ``--json``); :func:`main` here turns every failure into one ``error:`` line and an exit code."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import traceback

from llmopt.cli.parser import build_parser
from llmopt.errors import LLMOptError
from llmopt.outputs import Interrupted, install_signal_handlers, signal_raised

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure ends with exactly one last stderr line ``error: ...``.

    Input errors (:class:`LLMOptError`) exit 2, SIGINT 130, SIGTERM 143, anything unexpected 1 (a bug:
    ``--debug``, anywhere on the command line, shows the traceback of any error). Run as the program
    (``argv`` None: the ``llmopt`` script, ``python -m llmopt.cli``), a SIGINT or SIGTERM that arrives
    once the command has returned, while the interpreter exits, ends the process at once with 130 / 143."""
    install_signal_handlers()
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LLMOPT_DEBUG", "").strip().lower() in {"1", "true", "yes"}
    argv = [x for x in argv if x != "--debug"]
    try:
        code = _run(argv, debug)
        if as_program:
            _end_on_signal(code)
    except KeyboardInterrupt as e:  # one that came as the command returned
        code = _interrupted(e, debug)
        if as_program:
            _end_on_signal(code)
    return code


def _run(argv: list[str], debug: bool) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
        )
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return args.func(args)
    except LLMOptError as e:
        return _fail(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else 'failed'}", 2, debug)
    except KeyboardInterrupt as e:
        return _interrupted(e, debug)
    except SystemExit:
        raise
    except Exception as e:  # a bug, not an input error: still one line unless --debug
        if (signum := signal_raised()) is not None:  # the interrupt, replaced on its way out by C code
            return _interrupted(Interrupted(signum), debug)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return _fail(f"error: internal error {type(e).__name__}: {msg} (--debug shows the traceback)", 1, debug)


def _interrupted(e: KeyboardInterrupt, debug: bool) -> int:
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    return _fail(f"error: interrupted ({signal.Signals(signum).name})", 128 + int(signum), debug)


def _end_on_signal(code: int) -> None:
    """From now on SIGINT/SIGTERM end the process at once: with 128 + signal and one ``error:`` line after a
    successful command (its outputs are complete), with ``code`` and the error line already printed after a
    failed one. Python would raise the interrupt inside its own exit (atexit functions, finalizers), report
    it as ignored and exit ``code``: 0, as if nothing had been interrupted."""

    def end(signum, frame):  # noqa: ARG001 - signal handler signature
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if code == 0:
            line = f"error: interrupted ({signal.Signals(signum).name}) while exiting; the outputs are complete\n"
            with contextlib.suppress(OSError, ValueError):
                os.write(sys.stderr.fileno(), line.encode())
        os._exit(128 + signum if code == 0 else code)

    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) not in (signal.SIG_IGN, None):
            signal.signal(signum, end)


def _fail(line: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    return code
