"""Learned metrics (LPIPS, DISTS, NIQE, MUSIQ, MANIQA-pipal, CLIPIQA, FID) through pyiqa, offline only.

Why: the SR papers report these through pyiqa, so the same implementation must be used, but
adc neither depends on pyiqa nor downloads anything while evaluating (clusters are often
offline, and silent downloads make runs irreproducible). A metric is used only when pyiqa is
importable *and* the weight files it would fetch already exist on disk; otherwise it is
reported as unavailable with the reason. While a metric is created, hub downloads are
refused and Hugging Face is put in offline mode, so a file missing from the table below
fails fast instead of being fetched. pyiqa is imported under those settings too, so libraries
that read them once at import (huggingface_hub) stay offline for the rest of the process.

File locations follow pyiqa 0.1.10 - 0.1.13: its own weights in ``<torch hub dir>/pyiqa``,
torchvision backbones in ``<torch hub dir>/checkpoints``, CLIP in ``<torch hub dir>/clip``
(0.1.13) or ``~/.cache/clip`` (0.1.10), timm backbones in the Hugging Face hub cache.
``<torch hub dir>`` is ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import AdcError

if TYPE_CHECKING:  # torch is imported where used, so the metric table is cheap to import
    import torch

#: Environment variables that keep Hugging Face / transformers / timm from reaching the network.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class LearnedSpec:
    """How one learned metric is created through pyiqa and which files it needs on disk.

    ``files`` is a list of requirements; each requirement is a tuple of alternative locations
    (any one existing satisfies it). A location starts with ``torchhub:`` (relative to the torch
    hub dir), ``hfhub:`` (a glob in the Hugging Face hub cache) or ``~`` (home-relative).
    """

    pyiqa_name: str
    kind: str  # "FR" (SR vs HR per image), "NR" (SR only, per image) or "set" (two folders, e.g. FID)
    lower_better: bool
    files: tuple[tuple[str, ...], ...]


LEARNED_METRICS: dict[str, LearnedSpec] = {
    "lpips": LearnedSpec("lpips", "FR", True, (
        ("torchhub:pyiqa/LPIPS_v0.1_alex-df73285e.pth",),
        ("torchhub:checkpoints/alexnet-owt-7be5be79.pth",),
    )),
    "dists": LearnedSpec("dists", "FR", True, (
        ("torchhub:pyiqa/DISTS_weights-f5e65c96.pth",),
        ("torchhub:checkpoints/vgg16-397923af.pth",),
    )),
    "niqe": LearnedSpec("niqe", "NR", True, (
        ("torchhub:pyiqa/niqe_modelparameters.mat",),
    )),
    "musiq": LearnedSpec("musiq", "NR", False, (
        ("torchhub:pyiqa/musiq_koniq_ckpt-e95806b9.pth",),
    )),
    "maniqa": LearnedSpec("maniqa-pipal", "NR", False, (
        ("torchhub:pyiqa/MANIQA_PIPAL-ae6d356b.pth",),
        ("hfhub:models--timm--vit_base_patch8_224*",),
    )),
    "clipiqa": LearnedSpec("clipiqa", "NR", False, (
        ("torchhub:clip/RN50.pt", "~/.cache/clip/RN50.pt"),
    )),
    "fid": LearnedSpec("fid", "set", True, (
        ("torchhub:pyiqa/pt_inception-2015-12-05-6726825d.pth",),
    )),
}


def torch_hub_dir() -> Path:
    """The torch hub directory pyiqa caches into (honours ``$TORCH_HOME``)."""
    import torch.hub

    return Path(torch.hub.get_dir())


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def _resolve(location: str) -> list[Path]:
    if location.startswith("torchhub:"):
        p = torch_hub_dir() / location[len("torchhub:"):]
        return [p] if p.is_file() else []
    if location.startswith("hfhub:"):
        cache = hf_hub_cache()
        return sorted(cache.glob(location[len("hfhub:"):])) if cache.is_dir() else []
    p = Path(location).expanduser()
    return [p] if p.is_file() else []


def describe_location(location: str) -> str:
    """A location as a path a user can check (for 'weights not found' messages)."""
    if location.startswith("torchhub:"):
        return str(torch_hub_dir() / location[len("torchhub:"):])
    if location.startswith("hfhub:"):
        return str(hf_hub_cache() / location[len("hfhub:"):])
    return location


def missing_weights(name: str) -> list[str]:
    """Files (one per unmet requirement) that ``name`` would need but that are not on disk."""
    spec = LEARNED_METRICS[name]
    missing = []
    for alternatives in spec.files:
        if not any(_resolve(loc) for loc in alternatives):
            missing.append(describe_location(alternatives[0]))
    return missing


def pyiqa_version() -> str | None:
    """pyiqa's version if it can be imported (with offline settings), else None."""
    try:
        if importlib.util.find_spec("pyiqa") is None:
            return None
    except (ImportError, ValueError):  # ValueError: sys.modules['pyiqa'] is None (import blocked)
        return None
    with offline_guard():
        try:
            mod = importlib.import_module("pyiqa")
        except Exception:  # ImportError, or a broken install raising anything at import time
            return None
    return str(getattr(mod, "__version__", "unknown"))


class _DownloadRefused(RuntimeError):
    pass


def _refuse_download(url: str, *args: Any, **kwargs: Any) -> None:
    raise _DownloadRefused(f"download refused (adc never downloads weights): {url}")


@contextlib.contextmanager
def offline_guard() -> Iterator[None]:
    """Offline env vars and refused hub downloads for the duration of the block; all restored after."""
    import torch.hub

    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    patched: list[tuple[Any, str, Any]] = []
    targets = [torch.hub]
    dl = sys.modules.get("pyiqa.utils.download_util")
    if dl is not None:
        targets.append(dl)
    for mod in targets:
        if hasattr(mod, "download_url_to_file"):
            patched.append((mod, "download_url_to_file", mod.download_url_to_file))
            setattr(mod, "download_url_to_file", _refuse_download)
    try:
        yield
    finally:
        for mod, attr, orig in patched:
            setattr(mod, attr, orig)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class LearnedMetric:
    """A created pyiqa metric with adc's calling convention (float out, offline)."""

    name: str
    spec: LearnedSpec
    model: Callable[..., Any]

    def image(self, sr: torch.Tensor, hr: torch.Tensor) -> float:
        """Score one 1x3xHxW pair in [0, 1] (HR ignored for no-reference metrics).

        pyiqa's model moves inputs to its own device.
        """
        import torch

        with torch.no_grad():
            out = self.model(sr, hr) if self.spec.kind == "FR" else self.model(sr)
        return float(torch.as_tensor(out).flatten()[0].item())

    def folders(self, sr_dir: Path, hr_dir: Path) -> float:
        """Score a whole SR folder against the HR folder (FID)."""
        import torch

        with torch.no_grad(), offline_guard():
            out = self.model(str(sr_dir), str(hr_dir))
        return float(torch.as_tensor(out).flatten()[0].item())


def open_learned_metrics(names: list[str], device: str | torch.device | None = None
                         ) -> tuple[dict[str, LearnedMetric], dict[str, str]]:
    """Create the learned metrics that can run offline; return (metrics, {name: why unavailable}).

    Never raises for a missing pyiqa or missing weights: those metrics are skipped with a reason.
    """
    unknown = [n for n in names if n not in LEARNED_METRICS]
    if unknown:
        raise AdcError(f"unknown learned metric(s): {', '.join(unknown)}; choose from {', '.join(LEARNED_METRICS)}")
    ready: dict[str, LearnedMetric] = {}
    unavailable: dict[str, str] = {}
    if not names:
        return ready, unavailable
    if pyiqa_version() is None:
        return ready, {n: "unavailable (pyiqa not installed)" for n in names}
    import torch

    pyiqa = importlib.import_module("pyiqa")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in names:
        spec = LEARNED_METRICS[name]
        missing = missing_weights(name)
        if missing:
            unavailable[name] = f"unavailable (weights not found: {'; '.join(missing)})"
            continue
        try:
            with offline_guard():
                model = pyiqa.create_metric(spec.pyiqa_name, device=dev)
        except Exception as exc:  # pyiqa raises many types (AssertionError, RuntimeError, OSError, ...)
            first = " ".join(str(exc).split())[:160] or type(exc).__name__
            unavailable[name] = f"unavailable (pyiqa could not create it offline: {first})"
            continue
        ready[name] = LearnedMetric(name, spec, model)
    return ready, unavailable
