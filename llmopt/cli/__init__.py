"""Command line: ``llmopt eval``, ``llmopt compress``, ``llmopt export``, ``llmopt push``, ``llmopt harness``,
``llmopt report``, ``llmopt recipes``.

Each command is a few lines over the Python API. The jobs live in submodules: :mod:`~llmopt.cli.parser`
(the arguments), :mod:`~llmopt.cli.commands` (the command bodies), :mod:`~llmopt.cli.output` (what they
print and ``--json``); :func:`main` here turns every failure into one ``error:`` line and an exit code."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

from llmopt.cli.parser import build_parser
from llmopt.errors import LLMOptError
from llmopt.outputs import Interrupted, install_signal_handlers

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure ends with exactly one last stderr line ``error: ...``.

    Input errors (:class:`LLMOptError`) exit 2, SIGINT 130, SIGTERM 143, anything unexpected 1 (a bug:
    ``--debug``, anywhere on the command line, shows the traceback of any error)."""
    install_signal_handlers()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LLMOPT_DEBUG", "").strip().lower() in {"1", "true", "yes"}
    argv = [x for x in argv if x != "--debug"]
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
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        return _fail(f"error: interrupted ({name})", 128 + int(signum), debug)
    except SystemExit:
        raise
    except Exception as e:  # a bug, not an input error: still one line unless --debug
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return _fail(f"error: internal error {type(e).__name__}: {msg} (--debug shows the traceback)", 1, debug)


def _fail(line: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    return code
