"""The one exception type that crosses the user boundary.

Anything raised as a ``UserError`` is the user's to fix (a bad path, value or
file); its message is a single sentence that names the bad value and what is
allowed. The CLI prints it without a traceback and exits with status 2.
Everything else is a bug in the engine and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with what the user asked for, worded for the user."""
