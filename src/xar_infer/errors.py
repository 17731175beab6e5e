"""The errors that a user's input can cause, as opposed to bugs.

Every error xar_infer raises because of an argument, a setting, a file or the machine derives from
:class:`XARError`. The command-line tools report these, and the operating system's errors of file
access (``OSError``), as one line with exit status 2; any other exception is a bug and keeps its
traceback. Each class also derives from the built-in type that Python code would expect
(``ValueError`` for a bad value, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first non-blank line of an exception's message (torch and numpy add paragraphs below it), or
    its type's name when the message is empty: how a user error is shown in one line."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


class XARError(Exception):
    """Base of every error caused by input, files or resources rather than by a bug."""


class InvalidArgumentError(XARError, ValueError):
    """An argument or setting has a value that cannot work; the message names it and the fix."""


class InvalidArgumentTypeError(XARError, TypeError):
    """An argument has a type that cannot work; the message names it and the fix."""


class CheckpointError(XARError, ValueError):
    """A weight file is missing, unreadable, or does not fit the model it is loaded into."""


class NumericalError(XARError, RuntimeError):
    """Generation overflowed or produced NaN (typically fp16 weights)."""


class ResourceError(XARError, MemoryError):
    """A request needs more memory than the machine has; the message gives the estimate."""


class SampleSetError(XARError, RuntimeError):
    """A sample set's work folder is busy, foreign or inconsistent; the message says what to do."""
