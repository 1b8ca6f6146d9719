"""User-facing errors.

Every mistake a user can make (a bad recipe key, a missing file, a checkpoint that needs
arbitrary code to unpickle) raises :class:`AdcError`. Command-line entry points catch it and
print one line, with exit code 2 and no traceback; library callers can catch it like any
other exception.
"""


class AdcError(Exception):
    """A mistake in user input, reported as one line naming the file, key or value."""

    exit_code = 2
