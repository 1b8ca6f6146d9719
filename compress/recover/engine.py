"""A small, reusable training loop on ``accelerate``, shared by the recovery stages.

Why our own loop: both recovery stages (decoder pre-training, adversarial distillation) need
the same things and none of them is optional at 200 K steps on 8 GPUs: mixed precision,
gradient accumulation, DDP over any number of processes or nodes (``accelerate launch``),
checkpoints that survive ``kill -9`` and resume to *bit-identical* weights, a NaN guard that
stops at once, and a metrics CSV + loss curve per stage.

How a stage uses it: build the models and optimisers, describe them in a :class:`TrainSetup`
with a ``step_fn(ctx, batch)`` that computes losses and calls ``ctx.optimize(...)``, and call
:func:`train`. Everything random inside the loop must come from the batch (each item carries
its ``epoch`` and ``index``: :func:`item_seed`), never from the global RNG or the process
rank; that is what makes a 2-process run equal a 1-process run with the same global batch,
and a resumed run equal an uninterrupted one.

Data position: items are drawn from an endless stream of per-epoch seeded permutations of the
dataset; global step ``s`` reads stream positions ``[s*G, (s+1)*G)`` (``G`` = global batch),
split between processes and accumulation micro-batches. A checkpoint stores the step and the
position, so resuming needs no skipped batches and no sampler state.

Multi-node: ``run_dir`` must be on a file system all nodes share (as ``accelerate.save_state``
assumes): every process writes its RNG state into the checkpoint, the main process renames it.

Run directory (one per stage)::

    checkpoints/step-00001000/   accelerate state (models, optimisers, schedulers, scaler, RNG)
                                 + trainer_state.json (step, data position); written to a
                                 .tmp-* folder and renamed, so a listed checkpoint is complete
    metrics.csv                  step, each loss term (mean since the previous row, over all
                                 processes), lr per optimiser, steps/s
    loss_curve.png               the loss terms against the step
    summary.json                 steps/s, peak memory, device, precision, processes, batch
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import ranged, check_range, from_dict
from ..errors import AdcError
from ..io import atomic_path, atomic_write_json
from ..log import get_logger

logger = get_logger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.csv"
CURVE_FILE = "loss_curve.png"
SUMMARY_FILE = "summary.json"
BEST_FILE = "best_weights.safetensors"  # in a checkpoint: the keep_best modules at the best validation score


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class EngineConfig:
    """How to train (not what): steps, batch, precision, checkpoints, logging.

    ``batch_size`` is the *global* batch per optimiser step (all processes x accumulation);
    it must divide by ``num_processes * gradient_accumulation_steps``. ``max_steps``,
    ``batch_size`` and ``checkpoint_every`` left unset take the stage's defaults
    (:meth:`with_defaults`). ``mixed_precision="auto"``: bf16 on a GPU, none on a CPU; fp16
    needs a GPU (accelerate adds the GradScaler; AdcSR's fp16 overflows in places, hence bf16).
    """

    max_steps: int | None = ranged(None, 1, 10**9)
    batch_size: int | None = ranged(None, 1, 65536)
    micro_batch_size: int | None = ranged(None, 1, 65536)  # per process and forward pass: sets the accumulation steps
    gradient_accumulation_steps: int = ranged(1, 1, 65536)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    cpu: bool = False
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    checkpoint_every: int | None = ranged(None, 1, 10**9)
    keep_checkpoints: int = ranged(1, 1, 1000)
    resume: bool = True
    log_every: int = ranged(10, 1, 10**9)
    num_workers: int = ranged(0, 0, 256)
    max_grad_norm: float = ranged(0.0, 0, 1e6)          # 0 = no clipping
    find_unused_parameters: bool = False
    seed: int = ranged(0, 0, 2**32 - 1)
    progress: bool = True
    trackers: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)  # accelerate's log_with (off)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, path: str = "engine") -> "EngineConfig":
        return from_dict(cls, dict(d or {}), path)

    def with_defaults(self, **defaults: Any) -> "EngineConfig":
        """A copy with the unset (None) fields taken from ``defaults``."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def validate(self, path: str) -> None:
        for name in ("max_steps", "batch_size", "micro_batch_size", "gradient_accumulation_steps", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AdcError(f"{path}.{name}: expected a positive integer, got {value}")
        if self.num_workers < 0:
            raise AdcError(f"{path}.num_workers: expected >= 0, got {self.num_workers}")
        for i, name in enumerate(self.trackers):
            module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
            if module is None:
                raise AdcError(f"{path}.trackers[{i}]: {name!r} is not one of 'tensorboard', 'wandb'")
            try:
                __import__(module)
            except ImportError:
                raise AdcError(f"{path}.trackers[{i}]: {name} is not installed (pip install {module})") from None
        check_range(self.max_grad_norm, 0.0, math.inf, f"{path}.max_grad_norm")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class NonFiniteLossError(AdcError):
    """A loss term became NaN or inf: training stopped before the step was applied."""

    def __init__(self, step: int, term: str, value: float | None, checkpoint: Path | None):
        self.step, self.term, self.value, self.checkpoint = step, term, value, checkpoint
        what = "not finite on another process" if value is None else f"{value}"
        kept = f"last good checkpoint kept: {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"step {step}: loss term '{term}' is {what}; training stopped ({kept})")


# --------------------------------------------------------------------------------------------
# Deterministic data stream
# --------------------------------------------------------------------------------------------
def item_seed(seed: int, epoch: int, index: int, tag: int = 0) -> int:
    """A 63-bit seed for one item's randomness (degradation, noise): independent of the
    process count and of resuming, because it depends only on what the item is."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index), int(tag)])
    return int(ss.generate_state(1, dtype=np.uint64)[0]) >> 1


class StreamSampler(Sampler):
    """Endless ``(epoch, index)`` keys for one process, from global stream position ``start``.

    The stream is the concatenation of per-epoch permutations (seeded by ``seed`` and the epoch);
    micro-batch ``m`` covers positions ``start + m*L*P + p*L + [0, L)`` for process ``p`` of ``P``.
    """

    def __init__(self, size: int, seed: int, start: int, local_batch: int, num_processes: int = 1,
                 process_index: int = 0, shuffle: bool = True):
        if size < 1:
            raise AdcError("the training dataset is empty")
        self.size, self.seed, self.start = int(size), int(seed), int(start)
        self.local_batch, self.num_processes, self.process_index = int(local_batch), int(num_processes), int(process_index)
        self.shuffle = shuffle

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, epoch, 0x5EED])).permutation(self.size)

    def key(self, position: int, cache: dict) -> tuple[int, int]:
        epoch, offset = divmod(position, self.size)
        if cache.get("epoch") != epoch:
            cache["epoch"], cache["perm"] = epoch, self.permutation(epoch)
        return epoch, int(cache["perm"][offset])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        cache: dict = {}
        q = self.start + self.process_index * self.local_batch
        stride = self.local_batch * self.num_processes
        while True:
            for j in range(self.local_batch):
                yield self.key(q + j, cache)
            q += stride

    def __len__(self) -> int:  # endless; DataLoader only needs a number for its own bookkeeping
        return 2**62


class KeyedDataset(Dataset):
    """Wraps a dataset so that item ``(epoch, index)`` is item ``index`` of epoch ``epoch``.

    Datasets with ``set_epoch`` (e.g. :class:`compress.data.HRCropDataset`) get their crops for
    that epoch. The item comes back as a dict (a non-dict item under ``"data"``) with ``epoch``
    and ``index`` added, so the step can seed per-item randomness with :func:`item_seed`.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        item = self.dataset[index]
        item = dict(item) if isinstance(item, Mapping) else {"data": item}
        item["epoch"], item["index"] = epoch, index
        return item


# --------------------------------------------------------------------------------------------
# What a stage hands to the engine
# --------------------------------------------------------------------------------------------
@dataclass
class TrainSetup:
    """Models, optimisers and the step of one training stage.

    ``trainable``: modules with trainable parameters (wrapped for DDP, saved in checkpoints);
    frozen parameters inside them are allowed. ``frozen``: modules only moved to the device.
    ``losses``: the loss-term names each optimiser logs, e.g. ``{"G": ["l1", "adv"], "D": ["d"]}``
    (fixes the CSV columns and the plot). ``step_fn(ctx, batch)`` runs one micro-batch.
    ``markers``: steps where the training changes on purpose, drawn on the loss curve so a jump
    there is read as the schedule, not a fault (e.g. ``{"discriminator starts": [100], "lr x0.5": [200]}``).

    Validation (optional): ``validate(ctx)`` returns a score, higher is better, measured by the engine
    before the first step (step 0, or the resumed step when a checkpoint holds no score yet), every
    ``val_every`` steps and after the last one, outside autocast and without gradients, with the
    trainable modules in eval mode. Every process calls it (same data, same weights) and the main
    process's score is broadcast, so all processes take the same decisions. The score goes to
    metrics.csv (column ``val_name``) and the summary. ``keep_best``: trainable modules whose weights
    at the best score (the earliest on a tie, step 0 included) are kept on the CPU and put back after
    the last step, so the stage never returns weights worse on the validation set than it started
    from. The best score and those weights live in every checkpoint: a resumed run keeps them.
    """

    name: str
    trainable: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    losses: dict[str, list[str]]
    step_fn: Callable[["StepContext", dict], None]
    dataset: Dataset
    schedulers: dict[str, Any] = field(default_factory=dict)
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    shuffle: bool = True
    markers: dict[str, list[int]] = field(default_factory=dict)
    validate: Callable[["StepContext"], float] | None = None
    val_every: int = 0                      # 0: only before the first and after the last step
    val_name: str = "val"
    keep_best: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.keep_best and self.validate is None:
            raise AdcError(f"{self.name}: keep_best {list(self.keep_best)} needs a validate function")
        if set(self.keep_best) - set(self.trainable):
            raise AdcError(f"{self.name}: keep_best names {sorted(set(self.keep_best) - set(self.trainable))}, "
                           "which are not trainable modules")
        if self.val_every < 0:
            raise AdcError(f"{self.name}: val_every must be >= 0, got {self.val_every}")
        if set(self.losses) - set(self.optimizers):
            raise AdcError(f"{self.name}: loss groups {sorted(set(self.losses) - set(self.optimizers))} have no optimiser")
        terms = [t for ts in self.losses.values() for t in ts]
        if len(terms) != len(set(terms)):
            raise AdcError(f"{self.name}: loss term names must be unique across optimisers, got {terms}")
        if self.validate is not None and self.val_name in terms:
            raise AdcError(f"{self.name}: val_name {self.val_name!r} is also a loss term")


@dataclass
class TrainResult:
    models: dict[str, nn.Module]
    step: int
    summary: dict[str, Any]
    run_dir: Path
    checkpoint: Path | None


class StepContext:
    """What ``step_fn`` sees: prepared models, the device, autocast and :meth:`optimize`."""

    def __init__(self, accelerator, setup: TrainSetup, prepared: dict[str, nn.Module],
                 optimizers: dict[str, Any], config: EngineConfig, last_checkpoint: Callable[[], Path | None]):
        self.accelerator = accelerator
        self.setup = setup
        self.config = config
        self._prepared = prepared
        self._optimizers = optimizers
        self._last_checkpoint = last_checkpoint
        self.step = 0           # 1-based optimiser step being computed
        self.micro = 0          # micro-batch within the step (gradient accumulation)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._term_group = {t: g for g, ts in setup.losses.items() for t in ts}

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def model(self, name: str) -> nn.Module:
        """The trainable module as prepared (DDP-wrapped when distributed): call it for training forwards."""
        return self._prepared[name]

    def unwrap(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self._prepared[name])

    def frozen(self, name: str) -> nn.Module:
        return self.setup.frozen[name]

    def autocast(self):
        return self.accelerator.autocast()

    def optimize(self, optimizer: str, terms: Mapping[str, torch.Tensor],
                 weights: Mapping[str, float] | None = None) -> torch.Tensor:
        """Check every term is finite (on all processes), back-propagate the weighted sum and step.

        The optimiser steps (and zeroes its gradients) only on the last micro-batch of a step;
        accelerate divides the loss by the accumulation count. A non-finite term raises
        :class:`NonFiniteLossError` *before* anything is applied, so the weights and the last
        checkpoint stay good.
        """
        if optimizer not in self.setup.optimizers:
            raise AdcError(f"{self.setup.name}: no optimiser named {optimizer!r}")
        names = list(terms)
        for n in names:
            if self._term_group.get(n) != optimizer:
                raise AdcError(f"{self.setup.name}: loss term {n!r} is not declared for optimiser {optimizer!r}")
        values = torch.stack([terms[n].detach().double().reshape(()) for n in names])
        bad = (~torch.isfinite(values)).float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        if bool((bad > 0).any()):
            i = int(torch.nonzero(bad > 0)[0])
            local = values[i].item()
            raise NonFiniteLossError(self.step, names[i], None if math.isfinite(local) else local,
                                     self._last_checkpoint())
        weights = weights or {}
        total = sum(float(weights.get(n, 1.0)) * terms[n] for n in names)
        self.accelerator.backward(total)
        opt = self._optimizers[optimizer]
        if self.config.max_grad_norm > 0 and self.accelerator.sync_gradients:
            params = [p for g in opt.param_groups for p in g["params"]]
            self.accelerator.clip_grad_norm_(params, self.config.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for n, v in zip(names, values.tolist()):
            self._sums[n] = self._sums.get(n, 0.0) + v
            self._counts[n] = self._counts.get(n, 0) + 1
        return total

    def log(self, name: str, value: float | torch.Tensor) -> None:
        """Log an extra, undeclared value for this step (not part of the NaN guard)."""
        v = float(value.detach().float().item() if torch.is_tensor(value) else value)
        self._sums[name] = self._sums.get(name, 0.0) + v
        self._counts[name] = self._counts.get(name, 0) + 1

    def _take_means(self) -> dict[str, float]:
        out = {k: self._sums[k] / self._counts[k] for k in self._sums}
        self._sums, self._counts = {}, {}
        return out


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for losses; fp32 and fp64 are kept (fp64 runs are used for exactness tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients into ``module``'s parameters (e.g. D during the G step),
    so no gradient is computed for them and no DDP hook fires; restored afterwards."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def enable_gradient_checkpointing(module: nn.Module) -> int:
    """Turn on activation checkpointing in every diffusers block of ``module``; return how many.

    diffusers blocks carry a ``gradient_checkpointing`` flag and call
    ``self._gradient_checkpointing_func``; ``ModelMixin.enable_gradient_checkpointing`` sets
    both, but AdcSR's condition-free UNet and the bare ``Decoder`` are not ``ModelMixin``s,
    so set them directly (non-reentrant ``torch.utils.checkpoint``, as diffusers does).
    """
    import functools

    import torch.utils.checkpoint as cp

    def fn(block, *args):
        return cp.checkpoint(block.__call__, *args, use_reentrant=False)

    n = 0
    for m in module.modules():
        if isinstance(getattr(m, "gradient_checkpointing", None), bool):
            m._gradient_checkpointing_func = functools.partial(fn)
            m.gradient_checkpointing = True
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed into place, with a trainer state), oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None: it looks whole), found without loading it.

    A crash, a full disk or a copy cut short can truncate its files after the rename that made it
    "complete": the trainer state must parse, safetensors headers must fit their files, and
    torch archives must have their zip directory (written last).
    """
    import zipfile

    try:
        state = read_trainer_state(checkpoint)
        if not isinstance(state, dict) or "step" not in state:
            return f"{STATE_FILE} has no step"
    except AdcError as exc:
        return str(exc)
    for f in sorted(checkpoint.iterdir()):
        try:
            if f.suffix == ".safetensors":
                import json

                with f.open("rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    raw = fh.read(n)
                if len(raw) < n:
                    return f"{f.name} is truncated"
                header = json.loads(raw)
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if f.stat().st_size < 8 + n + end:
                    return f"{f.name} is truncated"
            elif f.suffix in (".bin", ".pt", ".pkl"):
                zipfile.ZipFile(f).close()
        except Exception as exc:  # any reader error means: not usable
            return f"{f.name} is unreadable ({type(exc).__name__})"
    return None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdcError(f"{checkpoint / STATE_FILE}: unreadable trainer state ({exc})") from None


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.csv, appended row by row; on resume the rows after the resumed step are dropped."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None):
        self.path, self.columns = path, columns
        kept: list[dict] = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        with atomic_path(path) as tmp:
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                w.writeheader()
                w.writerows(kept)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def curve_markers(markers: Mapping[str, Any] | None, last: float) -> list[tuple[int, str]]:
    """``(step, label)`` of the markers in ``(1, last]``, sorted by step.

    Step 1 is the start (a discriminator on from the first step marks nothing) and a step after
    ``last`` is one a short run never reached: both are left out.
    """
    out = []
    for label, steps in (markers or {}).items():
        for step in ([steps] if isinstance(steps, (int, float)) else steps or []):
            if 1 < step <= last:
                out.append((int(step), label))
    return sorted(out)


def loss_figure(df, groups: dict[str, list[str]], title: str, markers: Mapping[str, Any] | None = None):
    """The loss-curve figure (see :func:`plot_losses`); returned so tests can read its lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(g, [t for t in ts if t in df and df[t].notna().any()]) for g, ts in groups.items()]
    rows = [(g, ts) for g, ts in rows if ts] or [(next(iter(groups)), [])]
    cols = max(1, max(len(ts) for _, ts in rows))
    from matplotlib.ticker import MaxNLocator

    # one x axis for every panel: a term that starts late (an adversarial one) lines up with the rest
    fig, axes = plt.subplots(len(rows), cols, figsize=(4.4 * cols, 3.1 * len(rows)), squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    marks = curve_markers(markers, float(df["step"].max()) if len(df) else 0.0)
    for r, (group, terms) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(terms):
                ax.axis("off")
                continue
            t = terms[c]
            s = df[["step", t]].dropna()
            color = colors[(r * cols + c) % len(colors)]
            span = max(2, len(s) // 20)
            dots = {"marker": "o", "ms": 3} if len(s) <= 30 else {}  # a few rows (or one) stay visible
            ax.plot(s["step"], s[t], lw=0.8, alpha=0.35, color=color, label="raw (mean per logged row)", **dots)
            ax.plot(s["step"], s[t].ewm(span=span).mean(), lw=1.8, color=color, label=f"EMA over {span} rows")
            for j, (step, label) in enumerate(marks):
                ax.axvline(step, color="0.3", ls=("--", ":", "-.")[j % 3], lw=1.0, label=f"{label} (step {step})")
            ax.set_title(f"{group}: {t}", fontsize=10)
            ax.set_xlabel("optimiser step", fontsize=8)
            ax.tick_params(labelbottom=True)  # sharex hides them on upper rows; each panel reads alone
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
            ax.tick_params(labelsize=8)
            ax.legend(fontsize=7, loc="best")
            ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: training losses (linear axes, one panel per term)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_losses(csv_path: Path, png_path: Path, groups: dict[str, list[str]], title: str,
                markers: Mapping[str, Any] | None = None) -> Path | None:
    """The loss curves: one panel per optimiser, each term raw (faint) and smoothed (EMA over the
    logged rows), both in the legend; linear axes, so equal heights are equal losses. A term is
    drawn only where it was computed (an adversarial term before its discriminator starts is
    missing, not 0). ``markers`` ({label: steps}): vertical lines where the schedule changes."""
    import pandas as pd

    df = pd.read_csv(csv_path)
    if df.empty:
        return None
    fig = loss_figure(df, groups, title, markers)
    import matplotlib.pyplot as plt  # after loss_figure chose the Agg backend
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return png_path


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def checkpoint_trainable_only(modules: list[nn.Module]) -> Iterator[None]:
    """While training, checkpoints of ``modules`` hold their trainable parameters and buffers, not
    their frozen parameters: those never change in training and come back from the stage's own
    inputs when it is rebuilt to resume (AdcSR's discriminator: 4.8 M trainable of a 3.5 GB UNet).

    A ``state_dict`` post-hook drops the frozen ones; a ``load_state_dict`` pre-hook puts the
    module's current values back in their place, so loading stays strict. Removed on exit.
    """
    handles = []
    for m in modules:
        handles += _trainable_only(m)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _trainable_only(module: nn.Module) -> list:
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    if not frozen:
        return []

    def drop(mod, state_dict, prefix, local_metadata):
        for n in frozen:
            state_dict.pop(prefix + n, None)

    def restore(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        params = dict(mod.named_parameters())
        for n in frozen:
            state_dict.setdefault(prefix + n, params[n].detach())

    return [module.register_state_dict_post_hook(drop), module.register_load_state_dict_pre_hook(restore)]


def resolve_mixed_precision(config: EngineConfig, cuda: bool) -> str:
    if config.mixed_precision == "auto":
        return "bf16" if cuda else "no"
    if config.mixed_precision == "fp16" and not cuda:
        raise AdcError("engine.mixed_precision: fp16 needs a GPU (use bf16 or no on a CPU)")
    return config.mixed_precision


def process_state(config: EngineConfig):
    """accelerate's per-process state (rank, world size), created with the same CPU/GPU choice as
    the Accelerator: a bare ``PartialState()`` on a CPU-only machine would ignore torchrun's
    WORLD_SIZE and pin every process to a 1-process state."""
    from accelerate import PartialState

    return PartialState(cpu=config.cpu or not torch.cuda.is_available())


def with_micro_batch(config: EngineConfig) -> EngineConfig:
    """The accumulation steps that give ``batch_size`` from ``micro_batch_size`` items per process and pass
    (AdcSR's global batch 96 on fewer or smaller GPUs: same result, less memory per step)."""
    if config.micro_batch_size is None:
        return config
    procs = process_state(config).num_processes
    per_step = procs * config.micro_batch_size
    if config.batch_size % per_step:
        raise AdcError(f"engine.micro_batch_size: {config.micro_batch_size} x {procs} process(es) does not divide "
                       f"batch_size {config.batch_size}")
    return replace(config, gradient_accumulation_steps=config.batch_size // per_step)


def make_accelerator(config: EngineConfig, project_dir: Path | None = None):
    """A fresh Accelerator. accelerate keeps process-wide singletons; they are reset here so
    that stages run one after another in one process can each choose their own precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    process_state(config)
    cuda = torch.cuda.is_available() and not config.cpu
    if "wandb" in config.trackers:
        os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine unless the user says so
    return Accelerator(cpu=config.cpu or not torch.cuda.is_available(),
                       log_with=list(config.trackers) or None,
                       project_dir=str(project_dir / "trackers") if project_dir and config.trackers else None,
                       mixed_precision=resolve_mixed_precision(config, cuda),
                       gradient_accumulation_steps=config.gradient_accumulation_steps,
                       step_scheduler_with_optimizer=False,
                       kwargs_handlers=[DistributedDataParallelKwargs(
                           find_unused_parameters=config.find_unused_parameters)])


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def train(setup: TrainSetup, config: EngineConfig, run_dir: str | os.PathLike,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Run ``setup`` for ``config.max_steps`` optimiser steps in ``run_dir`` (resuming if allowed)."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    log = log or logger.info
    config.validate("engine")
    unset = [k for k in ("max_steps", "batch_size", "checkpoint_every") if getattr(config, k) is None]
    if unset:
        raise AdcError(f"engine.{unset[0]}: not set (stages fill it with EngineConfig.with_defaults)")
    config = with_micro_batch(config)
    acc = make_accelerator(config, run_dir)
    try:
        with checkpoint_trainable_only(list(setup.trainable.values())):
            return _train(acc, setup, config, run_dir, log, tqdm)
    finally:
        from accelerate.state import AcceleratorState, GradientState

        acc.free_memory() if hasattr(acc, "free_memory") else None
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


def _resumed_validation(setup: TrainSetup, state: dict, checkpoint: Path):
    """The validation record and best weights a checkpoint holds, or (None, None): measured again then."""
    val = state.get("validation")
    if setup.validate is None or not val or val.get("best_step") is None:
        return None, None
    if not setup.keep_best:
        return dict(val), None
    if set(val.get("keep_best") or []) != set(setup.keep_best) or not (checkpoint / BEST_FILE).is_file():
        return None, None
    from ..io import load_safetensors

    flat = load_safetensors(checkpoint / BEST_FILE)
    best = {n: {k[len(n) + 1:]: v for k, v in flat.items() if k.startswith(n + "/")} for n in setup.keep_best}
    return {k: v for k, v in val.items() if k != "keep_best"}, best


def _last_good_checkpoint(run_dir: Path, main: bool, log, name: str) -> Path | None:
    """The newest checkpoint that is whole; broken newer ones are set aside as ``.broken-step-N``."""
    for candidate in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        if main:
            log(f"[{name}] checkpoint {candidate.name} cannot be resumed from ({problem}); set aside, "
                "trying the one before")
            os.replace(candidate, candidate.with_name(f".broken-{candidate.name}"))
    if main:
        log(f"[{name}] no usable checkpoint: training starts over from step 0")
    return None


def _train(acc, setup: TrainSetup, config: EngineConfig, run_dir: Path, log, tqdm) -> TrainResult:
    procs, accum = acc.num_processes, config.gradient_accumulation_steps
    if config.batch_size % (procs * accum):
        raise AdcError(f"engine.batch_size: {config.batch_size} does not divide into {procs} processes x "
                       f"{accum} accumulation steps")
    local_batch = config.batch_size // (procs * accum)
    main = acc.is_main_process
    ckpt_root = run_dir / CHECKPOINT_DIR
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_root.mkdir(exist_ok=True)
        for stale in ckpt_root.glob(".tmp-*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
    acc.wait_for_everyone()

    previous = latest_checkpoint(run_dir)
    if previous is not None and not config.resume:
        raise AdcError(f"{run_dir}: holds checkpoints (latest {previous.name}) but engine.resume is false; "
                       f"use a new run directory or set resume: true")
    if previous is not None:
        previous = _last_good_checkpoint(run_dir, main, log, setup.name)
    acc.wait_for_everyone()
    if acc.device.type == "cuda" and config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    names = list(setup.trainable)
    if config.gradient_checkpointing:
        for m in setup.trainable.values():
            enable_gradient_checkpointing(m)
    for m in setup.frozen.values():
        m.to(acc.device)
    opt_names, sched_names = list(setup.optimizers), list(setup.schedulers)
    prepared = acc.prepare(*[setup.trainable[n] for n in names], *[setup.optimizers[n] for n in opt_names],
                           *[setup.schedulers[n] for n in sched_names])
    prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
    models = dict(zip(names, prepared[:len(names)]))
    optimizers = dict(zip(opt_names, prepared[len(names):len(names) + len(opt_names)]))
    schedulers = dict(zip(sched_names, prepared[len(names) + len(opt_names):]))

    start_step, position = 0, 0
    val: dict[str, Any] | None = None        # validation record: start, best and last (step, score)
    best_state: dict[str, dict[str, torch.Tensor]] | None = None
    if previous is not None:
        state = read_trainer_state(previous)
        acc.load_state(str(previous))
        start_step, position = int(state["step"]), int(state["samples_seen"])
        val, best_state = _resumed_validation(setup, state, previous)
        if state.get("global_batch") != config.batch_size and main:
            log(f"[{setup.name}] note: global batch changed from {state.get('global_batch')} to {config.batch_size} "
                f"on resume; data continues from sample {position}")
        if main:
            log(f"[{setup.name}] resumed from {previous} (step {start_step})")
    last_ckpt: list[Path | None] = [previous]

    ctx = StepContext(acc, setup, models, optimizers, config, lambda: last_ckpt[0])
    if previous is None:
        # Stages should not draw from the global RNG in the loop (use item_seed); if one does, a
        # fresh run starts from the seed and a resumed run from the RNG state load_state restored.
        torch.manual_seed(config.seed)

    trackers = bool(config.trackers)
    if trackers:
        acc.init_trackers(setup.name, config={"max_steps": config.max_steps, "batch_size": config.batch_size,
                                              "seed": config.seed, "mixed_precision": acc.mixed_precision})
    columns = ["step"] + [t for ts in setup.losses.values() for t in ts] + [f"lr_{o}" for o in opt_names] + ["steps_per_s"]
    if setup.validate is not None:
        columns.append(setup.val_name)
    metrics = MetricsLog(run_dir / METRICS_FILE, columns, start_step) if main else None

    def validate(step: int) -> float:
        """Score the current weights (all processes; main's score broadcast) and keep the best."""
        nonlocal val, best_state
        for m in prepared_models:
            m.eval()
        ctx.step = step
        try:
            with torch.no_grad():
                score = float(setup.validate(ctx))
        finally:
            for m in prepared_models:
                m.train()
        if procs > 1:
            from accelerate.utils import broadcast

            score = float(broadcast(torch.tensor([score], dtype=torch.float64, device=acc.device), from_process=0))
        if val is None:
            val = {"start_step": step, "start": score, "best_step": None, "best": None}
        val["last_step"], val["last"] = step, score
        if math.isfinite(score) and (val["best"] is None or score > val["best"]):
            val["best_step"], val["best"] = step, score
            if setup.keep_best:
                best_state = {n: {k: v.detach().cpu().clone()
                                  for k, v in acc.unwrap_model(models[n]).state_dict().items()}
                              for n in setup.keep_best}
        if main:
            if trackers:
                acc.log({setup.val_name: score}, step=step)
            if config.progress and not on_terminal:
                best = "none yet" if val["best"] is None else f"{val['best']:.4g} at step {val['best_step']}"
                log(f"[{setup.name}] step {step}: {setup.val_name} {score:.4g} (best {best})")
        return score

    sampler = StreamSampler(len(setup.dataset), config.seed, position, local_batch, procs, acc.process_index,
                            setup.shuffle)
    loader = DataLoader(KeyedDataset(setup.dataset), batch_size=local_batch, sampler=sampler,
                        num_workers=config.num_workers, pin_memory=acc.device.type == "cuda",
                        persistent_workers=config.num_workers > 0)
    batches = iter(loader)

    def save(step: int) -> Path:
        final = ckpt_root / checkpoint_name(step)
        tmp = ckpt_root / f".tmp-{checkpoint_name(step)}"
        if main and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if main:
            if best_state is not None:
                from ..io import save_safetensors

                save_safetensors({f"{n}/{k}": v for n, sd in best_state.items() for k, v in sd.items()}, tmp / BEST_FILE)
            atomic_write_json(tmp / STATE_FILE, {
                "stage": setup.name, "step": step, "samples_seen": position + (step - start_step) * config.batch_size,
                "global_batch": config.batch_size, "num_processes": procs, "gradient_accumulation_steps": accum,
                "seed": config.seed, "models": names, "optimizers": opt_names, "schedulers": sched_names,
                **({"validation": {**val, "keep_best": list(setup.keep_best)}} if val is not None else {})})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(run_dir)[:-config.keep_checkpoints]:
                doomed = ckpt_root / f".tmp-delete-{old.name}"  # renamed first: never a half-deleted "complete" one
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        acc.wait_for_everyone()
        last_ckpt[0] = final
        return final

    from ..profile.memory import track_memory

    from ..log import is_terminal

    on_terminal = is_terminal()
    bar = tqdm(total=config.max_steps, initial=start_step, desc=setup.name,
               disable=not (main and config.progress and on_terminal), dynamic_ncols=True)
    prepared_models = list(models.values())
    step = start_step
    for m in prepared_models:
        m.train()
    if setup.validate is not None and val is None:  # a fresh run (step 0), or a checkpoint without a score
        score = validate(start_step)
        if main:
            metrics.append({"step": start_step, setup.val_name: score})
    t_start = t_log = time.perf_counter()
    step_log = start_step
    try:
        with track_memory(acc.device) as memory:
            for step in range(start_step + 1, config.max_steps + 1):
                ctx.step = step
                for k in range(accum):
                    ctx.micro = k
                    batch = _to_device(next(batches), acc.device)
                    with acc.accumulate(*prepared_models):
                        setup.step_fn(ctx, batch)
                lrs = {f"lr_{o}": opt.param_groups[0]["lr"] for o, opt in optimizers.items()}  # used by this step
                for s in schedulers.values():
                    s.step()
                score = None
                if setup.validate is not None and (step == config.max_steps or
                                                   (setup.val_every and step % setup.val_every == 0)):
                    score = validate(step)
                logged = step % config.log_every == 0 or step == config.max_steps
                if score is not None and main and not logged:
                    metrics.append({"step": step, setup.val_name: score})
                if logged:
                    means = ctx._take_means()  # each term averaged over the steps since the last row
                    keys = sorted(means)
                    vals = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=acc.device)
                    if procs > 1:
                        vals = acc.reduce(vals, "mean")
                    means = dict(zip(keys, vals.tolist()))
                    now = time.perf_counter()
                    rate = (step - step_log) / max(now - t_log, 1e-9)
                    t_log, step_log = now, step
                    if main:
                        row = {"step": step, **means, **lrs, "steps_per_s": rate,
                               **({setup.val_name: score} if score is not None else {})}
                        metrics.append(row)
                        bar.set_postfix({k: f"{means[k]:.4g}" for k in keys[:6]}, refresh=False)
                        if trackers:
                            acc.log({**means, **lrs, "steps_per_s": rate}, step=step)
                        if config.progress and not on_terminal:  # a log line, not a redrawn bar
                            terms = ", ".join(f"{k} {means[k]:.4g}" for k in keys[:6])
                            log(f"[{setup.name}] step {step}/{config.max_steps}: {terms} ({rate:.2f} steps/s)")
                bar.update(1)
                if step % config.checkpoint_every == 0 or step == config.max_steps:
                    save(step)
    finally:
        bar.close()
        if trackers:
            acc.end_training()
    elapsed = time.perf_counter() - t_start
    done = step - start_step
    restored = val is not None and best_state is not None and val["best_step"] != step
    if restored:
        for n, sd in best_state.items():  # every process holds the same copy: the same weights everywhere
            acc.unwrap_model(models[n]).load_state_dict(sd)
        if main:
            log(f"[{setup.name}] kept the weights of step {val['best_step']} ({setup.val_name} {val['best']:.4g}; "
                f"{val['last']:.4g} at step {val['last_step']}, {val['start']:.4g} at step {val['start_step']})")
    mem, mem_kind = ((memory.cuda_max_allocated_mib, "cuda max_memory_allocated") if acc.device.type == "cuda"
                     else (memory.peak_anon_mib, "peak anonymous memory of the training loop (RssAnon)"))
    summary = {
        "stage": setup.name, "steps": step, "steps_this_run": done,
        "steps_per_s": round(done / elapsed, 4) if elapsed > 0 and done else None,
        "seconds": round(elapsed, 2), "peak_memory_mib": round(mem, 1), "peak_memory_kind": mem_kind,
        "memory": memory.to_dict(),
        "device": str(acc.device), "mixed_precision": acc.mixed_precision, "num_processes": procs,
        "global_batch": config.batch_size, "gradient_accumulation_steps": accum,
        "trainable_parameters": {n: sum(p.numel() for p in acc.unwrap_model(m).parameters() if p.requires_grad)
                                 for n, m in models.items()},
    }
    if val is not None:
        summary["validation"] = {"name": setup.val_name, **val, "keep_best": list(setup.keep_best),
                                 "restored": restored}
    if main:
        atomic_write_json(run_dir / SUMMARY_FILE, summary)
        groups = {**setup.losses, **({"validation": [setup.val_name]} if setup.validate is not None else {})}
        markers = {**setup.markers, **({"weights kept (best validation)": [val["best_step"]]} if restored else {})}
        plot_losses(run_dir / METRICS_FILE, run_dir / CURVE_FILE, groups, setup.name, markers)
        log(f"[{setup.name}] {done} steps in {elapsed:.1f} s = {summary['steps_per_s']} steps/s on {acc.device} "
            f"({acc.mixed_precision}, {procs} process(es)); peak memory {mem:.0f} MiB ({mem_kind})")
    unwrapped = {n: acc.unwrap_model(m, keep_fp32_wrapper=False) for n, m in models.items()}
    for m in unwrapped.values():
        m.eval()
    return TrainResult(unwrapped, step, summary, run_dir, last_ckpt[0])


__all__ = ["checkpoint_trainable_only", "EngineConfig", "TrainSetup", "TrainResult", "StepContext", "NonFiniteLossError", "train",
           "item_seed", "upcast", "StreamSampler", "KeyedDataset", "frozen_parameters", "enable_gradient_checkpointing",
           "list_checkpoints", "latest_checkpoint", "read_trainer_state", "plot_losses", "loss_figure", "curve_markers",
           "make_accelerator", "process_state", "resolve_mixed_precision", "CHECKPOINT_DIR", "METRICS_FILE", "CURVE_FILE",
           "SUMMARY_FILE", "STATE_FILE", "BEST_FILE"]
