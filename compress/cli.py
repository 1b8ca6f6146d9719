"""The exit conventions every adc command shares.

A user mistake (:class:`compress.errors.AdcError`) prints ``error: <one line>`` on stderr and
exits with its code (2); Ctrl-C prints ``interrupted`` and exits 130; no traceback for either.
"""

from __future__ import annotations

import sys
from typing import Callable

from .errors import AdcError

__all__ = ["run_cli"]


def run_cli(body: Callable[[], int]) -> int:
    """``body()``'s exit code, or the convention's for an :class:`AdcError` or Ctrl-C."""
    try:
        return body()
    except AdcError as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
