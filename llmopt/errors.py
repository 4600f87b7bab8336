"""User-facing errors.

Anything a user can cause (a bad spec, a misspelt recipe key, a group size that does not divide the
width, a file that is not UTF-8) raises :class:`LLMOptError` with a one-line message that says what to
do. The CLI prints it as ``error: <message>`` and exits with status 2; library callers can catch it.
:func:`read_text` and :func:`read_json` are the one way input text files are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class LLMOptError(Exception):
    """A one-line, actionable error caused by user input."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    for line in str(e).strip().splitlines():
        line = line.strip()
        if line:
            if len(line) > limit and ". " in line[:limit]:  # long: the first sentence
                line = line[: line.index(". ") + 1]
            return line[:limit]
    return type(e).__name__


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file; one-line LLMOptError when it is missing, unreadable or not UTF-8."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise LLMOptError(f"{what} {p} is a folder, not a file") from None
    except FileNotFoundError:
        raise LLMOptError(f"{what} {p} not found") from None
    except OSError as e:
        raise LLMOptError(f"cannot read {what} {p}: {e.strerror or type(e).__name__}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LLMOptError(
            f"{what} {p} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON file (UTF-8); one-line LLMOptError when it cannot be read or parsed."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LLMOptError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}): re-create it") from None
