"""``python -m compress.run RECIPE``: run a recipe's stages in order, resumably.

The run directory holds the resolved recipe, one folder per stage with its artifacts, and a
``DONE.json`` marker per finished stage. Stages hand the student to the next one in memory;
the runner saves it once at each stage boundary (``NN-stage/student/``: weights + the record
chain that rebuilds it, or the records alone for a structure-only run without weights).
``--resume`` skips finished stages and lets an interrupted training stage continue from its last
checkpoint. Paths in ``DONE.json`` are relative to the run directory, so it can be moved.
Stages whose weights or data are not given are skipped; the run then ends with one message
listing what to put where.

Several processes (``accelerate launch -m compress.run RECIPE``, ``torchrun --nproc_per_node N
-m compress.run RECIPE``, multi-node through accelerate's config): the training stages run
data-parallel on every process (the engine shards the data and keeps each item's randomness
independent of the rank); every other stage runs once, on the main process, while the others
wait and then read its results from the run directory. ``DONE.json``, reports, students and
checkpoints are written once; ``--resume`` works the same under N processes.

The run directory is new, empty or an adc run (its ``.adc-written`` claims it): a user's files in
another folder are never replaced. One process at a time holds it (``.adc-lock``): a second one
is refused with the holder's pid; a lock left by a process that died is taken over.

Exit codes: 0 done; 2 a mistake in the input (recipe, paths, files), one line on stderr;
3 stopped because weights or data are missing (what to give is listed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .bundle import Bundle
from .errors import AdcError, did_you_mean
from .io import atomic_write_json, atomic_write_text
from .ownership import FolderLock, WriteRecord, check_own_folder
from .log import get_logger, log_to_file, setup_logging
from .profile.memory import track_memory

logger = get_logger(__name__)
from .recipe import Recipe, load_recipe
from .stages import STAGES
from .targets import RESOLVED

EXIT_OK, EXIT_USER_ERROR, EXIT_NEEDS_WEIGHTS, EXIT_INTERRUPTED = 0, 2, 3, 130


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / f"{index:02d}-{name}"


def read_done(run_dir: Path, index: int, name: str) -> dict[str, Any] | None:
    marker = stage_dir(run_dir, index, name) / "DONE.json"
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None  # a marker cut short by a crash: the stage did not finish, run it again
    return done if isinstance(done, dict) and isinstance(done.get("artifacts"), dict) else None


class _Processes:
    """The processes of a launch (one, or accelerate's/torchrun's N): who runs what, and in step."""

    def __init__(self, recipe: Recipe):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from .recover.engine import EngineConfig, process_state

            self.state = process_state(EngineConfig(cpu=recipe.device == "cpu"))

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    @property
    def count(self) -> int:
        return 1 if self.state is None else self.state.num_processes

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, value: Any) -> Any:
        """The main process's ``value`` on every process (an error raised there stops them all)."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def once(self, fn, *args) -> Any:
        """``fn(*args)`` on the main process; its result, or its error as an AdcError, on all."""
        result: Any = None
        error: str | None = None
        if self.is_main:
            try:
                result = fn(*args)
            except AdcError as exc:
                error = str(exc)
                if self.state is None:
                    raise
        error = self.share(error)
        if error is not None:
            raise AdcError(error)
        return result


def run_recipe(recipe: Recipe, run_dir: Path, *, resume: bool = False, only: list[str] | None = None,
               log=None) -> dict[str, Any]:
    """Run the recipe's stages; return {"done": [...], "skipped": {stage: [needs]}, "bundle": Bundle,
    "main": whether this is the process that reports}.

    Progress goes to the ``adc`` loggers (and the run directory's ``run.log``); ``log`` replaces
    the line-per-stage messages (e.g. ``lambda m: None``).
    """
    check_stages(recipe, only)  # before the run directory exists: a refused --stages leaves nothing behind
    procs = _Processes(recipe)
    log = log or logger.info
    if not procs.is_main:
        log = _quiet  # one process reports
    lock = procs.once(_prepare_run_dir, recipe, run_dir, resume)  # the main process holds the folder's lock
    try:
        return _run_stages(recipe, run_dir, resume, only, procs, log)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(recipe: Recipe, run_dir: Path, resume: bool, only: list[str] | None, procs: _Processes,
                log) -> dict[str, Any]:
    if procs.is_main:
        log_to_file(run_dir / "run.log")
        logger.info(f"run directory {run_dir}, recipe {recipe.source or recipe.name}"
                    + (f", overrides {' '.join(recipe.overrides)}" if recipe.overrides else ""))

    if recipe.threads:
        import torch

        torch.set_num_threads(recipe.threads)
    bundle = Bundle(recipe, run_dir, processes=procs.count)
    done: list[str] = []
    for i, stage in enumerate(recipe.stages):
        spec = STAGES[stage.name]
        sdir = stage_dir(run_dir, i, stage.name)
        procs.wait()  # the main process's files of the stage before are in place
        previous = read_done(run_dir, i, stage.name)
        if only and stage.name not in only:
            if previous is not None:
                bundle.artifacts[stage.name] = previous["artifacts"]
            continue
        if previous is not None and resume:
            log(f"[{stage.name}] done before, skipped (--resume)")
            bundle.artifacts[stage.name] = previous["artifacts"]
            bundle.student = None  # reloaded from the newest saved student when a later stage asks
            done.append(stage.name)
            continue
        needs = list(dict.fromkeys(spec.needs(bundle, stage.config)))
        if needs:
            bundle.skipped[stage.name] = needs
            log(f"[{stage.name}] skipped: needs {'; '.join(needs)}")
            continue
        log(f"[{stage.name}] running" + (f" on {procs.count} processes" if spec.everyone and procs.count > 1 else ""))
        start = time.perf_counter()
        with track_memory(bundle.device) as memory:
            if spec.everyone:  # training: every process takes its share (the engine writes once)
                artifacts = spec.fn(bundle, stage.config, sdir) or {}
            else:
                artifacts = procs.once(_run_on_main, bundle, spec, stage, sdir)
        procs.once(_finish_stage, bundle, stage.name, sdir, artifacts, start, memory)
        if not procs.is_main:  # the main process ran it: take its results from the run directory
            bundle.artifacts[stage.name] = read_done(run_dir, i, stage.name)["artifacts"]
            bundle.student, bundle.student_changed, bundle.plan = None, False, None
        log(f"[{stage.name}] done in {time.perf_counter() - start:.1f} s")
        done.append(stage.name)
    procs.wait()
    if procs.is_main:
        log_to_file(None)
    return {"done": done, "skipped": bundle.skipped, "bundle": bundle, "main": procs.is_main}


def _quiet(*_args: Any) -> None:
    pass


def check_stages(recipe: Recipe, only: list[str] | None) -> None:
    """``--stages``: names of this recipe's stages, each once, in the recipe's order (they run in it)."""
    if only is None:
        return
    names = [s.name for s in recipe.stages]
    if not only:
        raise AdcError(f"--stages: no stage named; expected a comma-separated subset of {','.join(names)}")
    last = -1
    for name in only:
        if name not in names:
            raise AdcError(f"--stages: {name!r} is not a stage of this recipe{did_you_mean(name, names, quote=True)} "
                           f"(its stages: {','.join(names)})")
        if names.index(name) <= last:
            raise AdcError(f"--stages: {name!r} " + ("is named twice" if names.index(name) == last else
                           f"cannot come after {names[last]!r}") + f" (the recipe's order: {','.join(names)})")
        last = names.index(name)


def _earlier_recipe(resolved: Path) -> str:
    """The text of the resolved recipe an earlier run wrote; one line when it is not readable text."""
    try:
        return resolved.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise AdcError(f"{resolved}: not the UTF-8 text adc wrote (corrupt?); --resume cannot tell what the run was "
                       "started with: use a new --out") from None


def _prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool) -> FolderLock:
    """Check, lock and claim the run directory; returns its lock, held until the run ends.

    adc writes only into a new or empty folder or one of its own runs (its ``.adc-written`` claims
    it, or, from before that record, it holds ``recipe.resolved.yaml``): a user's ``report.md``
    elsewhere is never replaced. The lock keeps a second process off the folder.
    """
    check_own_folder(run_dir, "run", legacy=(RESOLVED,))
    lock = FolderLock(run_dir, "compress.run", log=logger.warning).acquire()
    try:
        existing = sorted(p.name for p in run_dir.glob("[0-9][0-9]-*"))
        if existing and not resume:
            raise AdcError(f"{run_dir}: holds an earlier run ({existing[0]}, ...); continue it with --resume "
                           "or choose a new --out (nothing was overwritten)")
        WriteRecord(run_dir).claim("compress.run")
        resolved = run_dir / RESOLVED
        text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
        if resolved.exists() and resume and _earlier_recipe(resolved) != text:
            raise AdcError(f"{resolved}: the recipe changed since this run started; use a new --out or drop --resume")
        atomic_write_text(resolved, text)
    except BaseException:
        lock.release()
        raise
    return lock


def _run_on_main(bundle: Bundle, spec, stage, sdir: Path) -> dict[str, Any]:
    sdir.mkdir(parents=True, exist_ok=True)
    return spec.fn(bundle, stage.config, sdir) or {}


def _finish_stage(bundle: Bundle, name: str, sdir: Path, artifacts: dict[str, Any], start: float, memory) -> None:
    """Save the student the stage handed on (once), then the stage's ``DONE.json`` with its time,
    its own peak memory, the disk its folder uses and the environment it ran in (run.log warns
    once when that differs from what earlier stages recorded, e.g. a ``--resume`` after an upgrade)."""
    from .environment import collect, warn_if_changed

    if bundle.student_changed:
        from .student import save_student

        save_student(sdir / "student", bundle.student)
        artifacts["student"] = bundle.rel(sdir / "student")
        bundle.student_changed = False
    bundle.artifacts[name] = artifacts
    disk = sum(f.stat().st_size for f in sdir.rglob("*") if f.is_file()) if sdir.is_dir() else 0
    environment = collect(bundle.device)
    warn_if_changed(bundle.run_dir, environment, sdir.name, logger.warning)
    atomic_write_json(sdir / "DONE.json", {"stage": name, "seconds": round(time.perf_counter() - start, 2),
                                           "memory": memory.to_dict(), "disk_mib": round(disk / 2**20, 2),
                                           "environment": environment, "artifacts": artifacts})


def main(argv: list[str] | None = None) -> int:
    from .cli import prog

    parser = argparse.ArgumentParser(prog=prog("run"), description=__doc__.splitlines()[0],
                                     epilog="exit codes: 0 done, 2 input error, 3 stopped for missing weights/data, "
                                            "130 interrupted")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/adcsr.yaml")
    parser.add_argument("--out", type=Path, help="run directory: new, empty or an adc run (default: runs/<recipe name>)")
    parser.add_argument("--resume", action="store_true", help="skip finished stages, continue an interrupted one")
    parser.add_argument("--stages", help="comma-separated subset of stages to run, in the recipe's order")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved recipe (YAML) and what each stage would do (run, or skip: not in "
                             "--stages, done before with --resume); create nothing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set stages.prune.unet.slice.ratio_keep=0.5; "
                             "paths are relative to the working directory")
    args = parser.parse_args(argv)
    setup_logging()
    from .cli import run_cli

    return run_cli(lambda: _run(args), interrupted="interrupted (finished stages are kept; continue with --resume)")


def _run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = args.out or Path("runs") / recipe.name
    only = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages is not None else None
    check_stages(recipe, only)
    if args.dry_run:
        sys.stdout.write(dry_run(recipe, run_dir, resume=args.resume, only=only))
        return EXIT_OK
    result = run_recipe(recipe, run_dir, resume=args.resume, only=only)
    report = run_dir / "report.md"
    if report.is_file() and result["main"]:  # one line per launch, not per process
        print(f"report: {report}")
    if result["skipped"]:
        wanted = sorted({need for needs in result["skipped"].values() for need in needs})
        if result["main"]:
            print(f"stopped: stages {', '.join(result['skipped'])} need weights or data not given in the recipe: "
                  f"{'; '.join(wanted)}", file=sys.stderr)
        return EXIT_NEEDS_WEIGHTS
    return EXIT_OK


def dry_run(recipe: Recipe, run_dir: Path, *, resume: bool = False, only: list[str] | None = None) -> str:
    """What ``adc run --dry-run`` prints: the resolved recipe as YAML, then (as YAML comments) the run
    directory and what each stage would do. Reads the run directory, if any; writes nothing."""
    check_stages(recipe, only)
    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    lines = [f"# dry run: nothing created; run directory {run_dir}"]
    try:
        check_own_folder(run_dir, "run", legacy=(RESOLVED,))
    except AdcError as exc:
        lines.append(f"# note: the run refuses it: {exc}")
    existing = sorted(p.name for p in run_dir.glob("[0-9][0-9]-*")) if run_dir.is_dir() else []
    resolved = run_dir / "recipe.resolved.yaml"
    if existing and not resume:
        lines.append(f"# note: {run_dir} holds an earlier run ({existing[0]}, ...): without --resume the run "
                     "refuses it")
    elif resume and resolved.is_file() and resolved.read_text() != text:
        lines.append(f"# note: {resolved} differs from this recipe: --resume refuses it")
    lines.append("# stages:")
    for i, stage in enumerate(recipe.stages):
        done = read_done(run_dir, i, stage.name) is not None
        if only and stage.name not in only:
            what = "skipped (not in --stages)"
        elif done and resume:
            what = "skipped (done before; --resume)"
        else:
            what = "runs" + (" (done before: skipped with --resume)" if done else "")
        lines.append(f"#   {stage_dir(run_dir, i, stage.name).name:<22} {what}")
    lines.append("# (a stage whose weights or data the recipe does not give is skipped when the run reaches it)")
    return text + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
