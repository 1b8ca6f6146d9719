"""``adc``: one command with the ``python -m`` entry points as subcommands.

    adc run RECIPE [--out DIR] [--resume] ...      = python -m compress.run
    adc sr --model RUN --input LR --output SR ...  = python -m compress.sr
    adc evaluate --sr SR --hr HR ...               = python -m compress.evaluate
    adc analyse --model FAMILY --out report.md ... = python -m compress.analysis
    adc compare [--lr-size 128] ...                = python -m profiling.compare
    adc families                                   lists the model families and named models
    adc --version

:func:`run_cli` is the exit convention every command shares: a user mistake
(:class:`compress.errors.AdcError`) prints ``error: <one line>`` on stderr and exits with its
code (2); Ctrl-C prints ``interrupted`` and exits 130; an unforeseen ``OSError`` is one
``error:`` line too (exit 2); no traceback for any of them.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from .errors import AdcError

COMMANDS = {
    "run": ("compress.run", "run a recipe's stages (analyse, remove, prune, recover, evaluate, profile, report)"),
    "sr": ("compress.sr", "super-resolve images with a run's student, official weights or a named model"),
    "evaluate": ("compress.evaluate", "score SR images against HR (PSNR/SSIM as pyiqa; learned metrics offline)"),
    "analyse": ("compress.analysis.__main__", "classify every module of a model: removable, foldable, prunable, keep"),
    "export": ("compress.export", "export a student to ONNX or torch.export"),
    "compare": ("profiling.compare", "params, MACs and latency of the teachers and AdcSR side by side"),
}


def run_cli(body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """``body()``'s exit code, or the convention's for an :class:`AdcError`, Ctrl-C (``interrupted``
    on stderr, 130) or an unforeseen ``OSError``."""
    try:
        return body()
    except AdcError as exc:
        print(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)  # one line, all of it
        return exc.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except OSError as exc:  # an environment fault no check foresaw (disk, permissions): still one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


def _usage() -> str:
    from . import __version__

    lines = [f"adc {__version__}: adversarial diffusion compression for real-world super-resolution", "",
             "usage: adc COMMAND [ARGS...]    (adc COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {about}" for name, (_, about) in COMMANDS.items()]
    lines += [f"  {'families':<10} list the model families and the named models they bring", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"adc {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "families":
        from .families import get, models

        for name, (family, kind) in sorted(models().items()):
            print(f"{name:<14} {kind:<8} family {family}: {get(family).title}")
        return 0
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; expected one of: {', '.join(COMMANDS)}, families", file=sys.stderr)
        return 2
    module = COMMANDS[cmd][0]
    try:
        entry = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        print(f"error: adc {cmd} is not available ({exc})", file=sys.stderr)
        return 2
    sys.argv = [f"adc {cmd}", *rest]  # the subcommand's --help shows its own name
    return int(entry.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
