"""What a run ran on: library versions, adc's version and commit, the device, torch's threads.

Why: identical runs are said to write identical bytes, and they do only under the same versions
and device; a number that moved between two machines (or a ``--resume`` after an upgrade) is
explained by this record, not guessed at. Every stage's ``DONE.json`` carries it, the report
prints it and says when a later stage ran under a different one.

Cheap on purpose (it runs once per stage): versions come from ``importlib.metadata`` (nothing
is imported), the commit is read from ``.git`` files (no ``git`` needed; only the uncommitted
changes flag asks ``git``, and its absence is not an error).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

# distribution names as pip knows them; a missing optional one is recorded as None
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "onnxruntime", "torch-pruning", "numpy")
NOT_COMPARED = ("date",)  # when a stage ran is not a difference in what it ran on


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        if dist == "onnxruntime":  # the GPU wheel has its own name
            try:
                return metadata.version("onnxruntime-gpu")
            except metadata.PackageNotFoundError:
                return None
        return None


def _read_ref(git_dir: Path, ref: str) -> str | None:
    path = git_dir / ref
    if path.is_file():
        return path.read_text().strip() or None
    packed = git_dir / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref:
                return parts[0]
    return None


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes) of the checkout adc runs from; (None, None) outside one.

    Only a repository whose root holds this package counts (a ``site-packages`` inside some
    other repository is not adc's checkout). Cached: the state at the first stage is the run's.
    """
    root = Path(__file__).resolve().parent.parent
    dot_git = root / ".git"
    try:
        if dot_git.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = dot_git.read_text().strip()
            if not text.startswith("gitdir:"):
                return None, None
            git_dir = (root / text.split(":", 1)[1].strip()).resolve()
        elif dot_git.is_dir():
            git_dir = dot_git
        else:
            return None, None
        head = (git_dir / "HEAD").read_text().strip()
        if head.startswith("ref:"):
            ref = head.split(":", 1)[1].strip()
            commit = _read_ref(git_dir, ref)
            if commit is None and (git_dir / "commondir").is_file():  # a worktree keeps branches in the main .git
                common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
                commit = _read_ref(common, ref)
        else:
            commit = head or None
    except OSError:
        return None, None
    dirty = None
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            dirty = bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # no git binary, or too slow: the commit alone is still worth recording
    return commit, dirty


def _device(device: Any) -> str:
    import torch

    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda})"
    from .profile.latency import _cpu_model

    return f"{dev.type}: {_cpu_model()} ({os.cpu_count()} logical CPUs)"


def collect(device: Any = None) -> dict[str, Any]:
    """The environment as one flat JSON-able dict (keys are stable: reports and comparisons use them)."""
    import torch  # already loaded by any stage

    from . import __version__

    commit, dirty = git_state()
    env: dict[str, Any] = {"python": platform.python_version()}
    env.update({name: _version(name) for name in PACKAGES})
    env.update({"adc": __version__, "git_commit": commit, "git_uncommitted_changes": dirty,
                "platform": f"{platform.system()} {platform.machine()}", "device": _device(device),
                "torch_threads": torch.get_num_threads(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return env


def _changes(recorded: dict[str, dict[str, Any]], current: dict[str, Any]) -> list[tuple[str, str, list[str], Any]]:
    out = []
    for key, now in current.items():
        if key in NOT_COMPARED:
            continue
        before: dict[str, list[str]] = {}
        for stage, env in recorded.items():
            if isinstance(env, dict) and key in env and env[key] != now:
                before.setdefault(str(env[key]), []).append(stage)
        out += [(key, value, stages, now) for value, stages in before.items()]
    return out


def differences(recorded: dict[str, dict[str, Any]], current: dict[str, Any]) -> list[str]:
    """One line per key whose value in ``current`` differs from what the ``recorded`` stages
    ({stage: environment}) wrote, e.g. ``torch: 2.12.0 (analyse, remove) -> 2.13.0``; the date is ignored."""
    return [f"{key}: {value} ({', '.join(stages)}) -> {now}" for key, value, stages, now in _changes(recorded, current)]


def recorded_environments(run_dir: Path, exclude: str | None = None) -> dict[str, dict[str, Any]]:
    """{stage: environment} from the run's ``DONE.json`` markers that carry one (``exclude``: a stage folder)."""
    import json

    found = {}
    for marker in sorted(Path(run_dir).glob("[0-9][0-9]-*/DONE.json")):
        if marker.parent.name == exclude:
            continue
        try:
            done = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(done, dict) and isinstance(done.get("environment"), dict):
            found[str(done.get("stage", marker.parent.name))] = done["environment"]
    return found


_warned: set[tuple[str, str, str]] = set()


def warn_if_changed(run_dir: Path, current: dict[str, Any], exclude: str | None, warn) -> list[str]:
    """Compare ``current`` with what earlier stages of ``run_dir`` recorded; ``warn`` once per run
    directory and changed value (a resumed run logs it at its first stage, not at every one)."""
    recorded = recorded_environments(run_dir, exclude)
    root = str(Path(run_dir).resolve())
    new = [(root, key, str(now)) for key, _v, _s, now in _changes(recorded, current)]
    lines = differences(recorded, current)
    if any(k not in _warned for k in new):
        _warned.update(new)
        warn("this stage ran in a different environment than earlier stages of the run recorded: "
             + "; ".join(lines) + " (numbers may differ from a run made in one go)")
    return lines


__all__ = ["PACKAGES", "collect", "differences", "git_state", "recorded_environments", "warn_if_changed"]
