"""``python -m compress.run RECIPE``: run a recipe's stages in order, resumably.

The run directory holds the resolved recipe, one folder per stage with its artifacts, and a
``DONE.json`` marker per finished stage. Stages hand the student to the next one in memory;
the runner saves it once at each stage boundary (``NN-stage/student/``: weights + the record
chain that rebuilds it, or the records alone for a structure-only run without weights).
``--resume`` skips finished stages and lets an interrupted training stage continue from its last
checkpoint. Paths in ``DONE.json`` are relative to the run directory, so it can be moved.
Stages whose weights or data are not given are skipped; the run then ends with one message
listing what to put where.

Exit codes: 0 done; 2 a mistake in the input (recipe, paths, files), one line on stderr;
3 stopped because weights or data are missing (what to give is listed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .bundle import Bundle
from .errors import AdcError
from .io import atomic_write_json, atomic_write_text
from .recipe import Recipe, load_recipe
from .stages import STAGES

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


def run_recipe(recipe: Recipe, run_dir: Path, *, resume: bool = False, only: list[str] | None = None,
               log=print) -> dict[str, Any]:
    """Run the recipe's stages; return {"done": [...], "skipped": {stage: [needs]}, "bundle": Bundle}."""
    existing = sorted(p.name for p in run_dir.glob("[0-9][0-9]-*")) if run_dir.is_dir() else []
    if existing and not resume:
        raise AdcError(f"{run_dir}: holds an earlier run ({existing[0]}, ...); continue it with --resume "
                       "or choose a new --out (nothing was overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "recipe.resolved.yaml"
    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    if resolved.exists() and resume and resolved.read_text() != text:
        raise AdcError(f"{resolved}: the recipe changed since this run started; use a new --out or drop --resume")
    atomic_write_text(resolved, text)
    if only:
        unknown = [s for s in only if recipe.stage(s) is None]
        if unknown:
            raise AdcError(f"--stages: {unknown[0]!r} is not a stage of this recipe "
                           f"({', '.join(s.name for s in recipe.stages)})")

    if recipe.threads:
        import torch

        torch.set_num_threads(recipe.threads)
    bundle = Bundle(recipe, run_dir)
    done: list[str] = []
    for i, stage in enumerate(recipe.stages):
        spec = STAGES[stage.name]
        sdir = stage_dir(run_dir, i, stage.name)
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
        log(f"[{stage.name}] running")
        sdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        artifacts = spec.fn(bundle, stage.config, sdir) or {}
        if bundle.student_changed:
            from .student import save_student

            save_student(sdir / "student", bundle.student)
            artifacts["student"] = bundle.rel(sdir / "student")
            bundle.student_changed = False
        seconds = time.perf_counter() - start
        bundle.artifacts[stage.name] = artifacts
        atomic_write_json(sdir / "DONE.json", {"stage": stage.name, "seconds": round(seconds, 2),
                                               "artifacts": artifacts})
        log(f"[{stage.name}] done in {seconds:.1f} s")
        done.append(stage.name)
    return {"done": done, "skipped": bundle.skipped, "bundle": bundle}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compress.run", description=__doc__.splitlines()[0],
                                     epilog="exit codes: 0 done, 2 input error, 3 stopped for missing weights/data, "
                                            "130 interrupted")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/adcsr.yaml")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--resume", action="store_true", help="skip finished stages, continue an interrupted one")
    parser.add_argument("--stages", help="comma-separated subset of stages to run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set stages.prune.unet.slice.ratio_keep=0.5; "
                             "paths are relative to the working directory")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        run_dir = args.out or Path("runs") / recipe.name
        only = [s.strip() for s in args.stages.split(",")] if args.stages else None
        result = run_recipe(recipe, run_dir, resume=args.resume, only=only)
    except AdcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted (finished stages are kept; continue with --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    report = run_dir / "report.md"
    if report.is_file():
        print(f"report: {report}")
    if result["skipped"]:
        wanted = sorted({need for needs in result["skipped"].values() for need in needs})
        print(f"stopped: stages {', '.join(result['skipped'])} need weights or data not given in the recipe: "
              f"{'; '.join(wanted)}", file=sys.stderr)
        return EXIT_NEEDS_WEIGHTS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
