"""User-facing errors.

Anything a user can cause (a bad spec, a misspelt recipe key, a group size that does not divide the
width) raises :class:`LLMOptError` with a one-line message that says what to do. The CLI prints it
as ``error: <message>`` and exits with status 2; library callers can catch it.
"""


class LLMOptError(Exception):
    """A one-line, actionable error caused by user input."""
