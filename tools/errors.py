"""The one error type for bad input.

Anything a user (or an LLM calling a tool) can get wrong raises :class:`InputError` with a single readable
sentence that says what is wrong and how to fix it. The CLI prints it on one line and exits with code 2; the
agent returns it to the LLM as a tool message. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input at a boundary (CLI flag, tool argument, loaded file). ``str(err)`` is the whole message."""

    def __init__(self, message: str) -> None:
        message = " ".join(message.split())  # always one line
        super().__init__(message)
        self.message = message


class Interrupted(Exception):
    """The user stopped a command (Ctrl-C, SIGTERM). ``message`` is one line saying what was kept and how to go on;
    the CLI prints it and exits with code 130 (the shell's code for SIGINT)."""

    def __init__(self, message: str) -> None:
        message = " ".join(message.split())
        super().__init__(message)
        self.message = message
