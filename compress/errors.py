"""User-facing errors.

Every mistake a user can make (a bad recipe key, a missing file, a checkpoint that needs
arbitrary code to unpickle) raises :class:`AdcError`. Command-line entry points catch it and
print one line, with exit code 2 and no traceback; library callers can catch it like any
other exception.
"""

import reprlib

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, in time bounded whatever the value.

    Why: error messages quote the user's value, and a value built from YAML aliases can expand
    to billions of items; ``{value!r}`` then runs for minutes and dies with MemoryError.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class AdcError(Exception):
    """A mistake in user input, reported as one line naming the file, key or value."""

    exit_code = 2


def did_you_mean(word: object, choices, quote: bool = False) -> str:
    """``"; did you mean NAME?"`` for the choice closest to ``word`` (difflib), or ``""``."""
    import difflib

    if not isinstance(word, str) or len(word) > 80:
        return ""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {close[0]!r}?" if quote else f"; did you mean {close[0]}?"
