"""Names of a package that load on first use (PEP 562), so importing it costs nothing.

Why: the command line checks its inputs before it pays for torch; a package's ``__init__`` that
imported its modules would import torch for ``--help``. One implementation for every package.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the submodule
    (relative, without the dot) that defines it; a loaded name is kept in ``namespace`` (the
    package's ``globals()``), so later lookups skip the function."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
