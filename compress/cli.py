"""``adc``: one command with the ``python -m`` entry points as subcommands.

    adc run RECIPE [--out DIR] [--resume] ...      = python -m compress.run
    adc sr --model RUN --input LR --output SR ...  = python -m compress.sr
    adc evaluate --sr SR --hr HR ...               = python -m compress.evaluate
    adc analyse --model NAME|RUN --out report.md   = python -m compress.analysis
    adc compare [--models NAME|RUN,...] ...        = python -m profiling.compare
    adc run RECIPE --dry-run                       prints the resolved recipe and what each stage would do
    adc families                                   lists the model families and named models
    adc --version

``adc`` alone prints this list on stderr and exits 2 (``adc --help``: stdout, exit 0); an unknown
command gets a "did you mean". Each subcommand's usage line reads ``adc X`` when run through
``adc`` and ``python -m MODULE`` when run as a module (:func:`prog`).

:func:`run_cli` is the exit convention every command shares: a user mistake
(:class:`compress.errors.AdcError`) prints ``error: <one line>`` on stderr and exits with its
code (2); Ctrl-C prints ``interrupted`` and exits 130; an unforeseen ``OSError`` is one
``error:`` line too (exit 2); no traceback for any of them. A reader that goes away
(``adc families | head -1``) ends the command quietly with 141 (128 + SIGPIPE), as shell tools do.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from .errors import AdcError, did_you_mean

COMMANDS = {
    "run": ("compress.run", "run a recipe's stages (analyse, remove, prune, recover, evaluate, profile, report)"),
    "sr": ("compress.sr", "super-resolve images with a run's student, official weights or a named model"),
    "evaluate": ("compress.evaluate", "score SR images against HR (PSNR/SSIM as pyiqa; learned metrics offline)"),
    "analyse": ("compress.analysis.__main__", "classify every module of a model or a run's student: removable, "
                "foldable, prunable, keep"),
    "export": ("compress.export", "export a student to ONNX or torch.export"),
    "compare": ("profiling.compare", "params, MACs and latency of teachers, AdcSR and run students side by side"),
}


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell tool exits with when its reader went away
_RUNNING: str | None = None  # the subcommand adc is running (its usage line reads "adc X")


def prog(cmd: str) -> str:
    """The name a subcommand's usage line shows: ``adc CMD`` when run through ``adc``, else
    ``python -m MODULE`` (how it was invoked)."""
    if _RUNNING == cmd or cmd not in COMMANDS:
        return f"adc {cmd}"
    return f"python -m {COMMANDS[cmd][0].removesuffix('.__main__')}"


def stdout_gone() -> int:
    """stdout's reader went away (``... | head``): send what is left to /dev/null, so that neither
    this nor the flush at exit prints a BrokenPipeError; the exit code is 141."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no real file (captured): nothing to redirect
        pass
    return EXIT_BROKEN_PIPE


def run_cli(body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """``body()``'s exit code, or the convention's for an :class:`AdcError`, Ctrl-C (``interrupted``
    on stderr, 130), a closed stdout (141, quietly) or an unforeseen ``OSError``."""
    try:
        rc = body()
        sys.stdout.flush()  # a reader gone before the end is seen here, not as a traceback at exit
        return rc
    except BrokenPipeError:
        return stdout_gone()
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


FAMILIES_HELP = """usage: adc families

List every model name adc can build: each family's teacher (built in, from an 'adc.families'
entry point, or registered by a plugin) and the named models it brings (students, parts).
Columns: name, kind (teacher, student or part), family and its title. Takes no arguments."""


def _families(rest: list[str]) -> int:
    if rest and rest[0] in ("-h", "--help"):
        print(FAMILIES_HELP)
        return 0
    if rest:
        print(f"error: adc families takes no arguments (got {rest[0]!r}); see adc families --help", file=sys.stderr)
        return 2
    from .families import get, models

    for name, (family, kind) in sorted(models().items()):
        print(f"{name:<14} {kind:<8} family {family}: {get(family).title}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(list(sys.argv[1:] if argv is None else argv))
        finally:
            sys.stdout.flush()  # inside the guard: a reader gone before exit ends quietly too
    except BrokenPipeError:
        return stdout_gone()


def _main(argv: list[str]) -> int:
    global _RUNNING
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"adc {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "families":
        return _families(rest)
    if cmd not in COMMANDS:
        names = [*COMMANDS, "families"]
        print(f"error: unknown command {cmd!r}{did_you_mean(cmd, names, quote=True)} (commands: {', '.join(names)}; "
              "adc --help)", file=sys.stderr)
        return 2
    module = COMMANDS[cmd][0]
    try:
        entry = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        print(f"error: adc {cmd} is not available ({exc})", file=sys.stderr)
        return 2
    saved, sys.argv = sys.argv, [f"adc {cmd}", *rest]  # what a parser without its own prog shows
    _RUNNING = cmd
    try:
        return int(entry.main(rest) or 0)
    finally:
        sys.argv, _RUNNING = saved, None


if __name__ == "__main__":
    sys.exit(main())
