"""Complexity of OSEDiff, S3Diff and AdcSR side by side: params, MACs, CPU latency, vs the reference.

    python -m profiling.compare [--lr-size 128] [--latency-size 64] [--device cpu] [--dtype fp32]
        [--out DIR] [--size full|tiny] [--models osediff,s3diff,adcsr] [--warmup 1]
        [--repeats 3] [--threads 1] [--no-latency] [--plugin MODULE]

Writes ``complexity.md`` (tables + the command that made them), ``complexity.csv`` (one row per
number, each labelled with device, dtype, resolution and counter) and ``complexity.png`` into
``--out`` (default ``./adc-compare``, a new folder in the working directory: the repo's own
``reports/`` are regenerated with ``--out reports/`` given explicitly).

``--models``: any model name of the families registry (``adc families``; plugin families with
``--plugin MODULE`` or an entry point) or an adc run directory: its newest student (its saved
architecture; ``--size`` does not apply), or its teacher before a student was saved
(:mod:`compress.targets`). The compressed model (AdcSR, else the first student named) is timed
in alternation with each teacher and compared with each.

Why this way:

* Params and MACs come from full-size models built on ``meta`` (no weights, seconds, < 1 GB):
  params per component of the zoo's ``components()``, MACs with ``FlopCounterMode`` (primary
  counter of :mod:`compress.profile.counters`) over each model's whole inference pipeline, split per
  component by module name. OSEDiff's pipeline includes the DAPE tag path, which the zoo's
  ``forward`` skips without a tokenizer and tag list; S3Diff's encodes two prompts (positive and
  negative), as the official inference does.
* LoRA that can be folded into the base weights (OSEDiff's UNet/VAE LoRA, DAPE's) is excluded
  from the MACs (as deployed: merged) and timed merged; its unmerged cost is shown in its own
  column. S3Diff's degradation-modulated LoRA cannot be merged, so its A/B matmuls and the r x r
  ``de_mod`` mix are part of its cost (the counter sees the mix as activation x activation, i.e.
  attention; it is moved to the LoRA column here).
* CPU latency: one full-size random-init model at a time (fp32 ~7 GB for OSEDiff) at a small LR
  size, the same pipeline that is counted, interleaved with AdcSR round by round so the
  teacher/AdcSR ratio is taken from calls made under the same machine load. The machine is
  shared: each model's record carries the load average and the CPU share this process obtained.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from compress.errors import AdcError
from compress.io import atomic_path, atomic_write_text
from compress.profile.pipeline import ModelCounts, count_pipeline
from compress.profile.latency import LatencyReport, measure_latency
from compress.config import int_in

__all__ = [
    "ModelSpec",
    "SPECS",
    "REFERENCE",
    "CompareOptions",
    "ModelCounts",
    "ModelLatency",
    "CompareResult",
    "pipeline_calls",
    "count_model",
    "time_models",
    "run_compare",
    "render_markdown",
    "tidy_table",
    "plot_png",
    "write_reports",
    "main",
]

COUNTER = "torch.utils.flop_counter.FlopCounterMode"
MODEL_ORDER = ("osediff", "s3diff", "adcsr")

Call = tuple[str, Callable[..., Any], tuple]
_DT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_TORCH_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# What is run, per model: the family's pipeline spec (compress.families), by model name
# ---------------------------------------------------------------------------------------------


def _adcsr_calls(model: nn.Module, lr: torch.Tensor) -> list[Call]:
    m = model.config.pad_multiple
    if lr.shape[-1] % m or lr.shape[-2] % m:
        raise AdcError(f"AdcSR needs LR sides divisible by {m}; got {tuple(lr.shape[-2:])}")
    return [("forward", model, (lr,))]


@dataclass(frozen=True)
class ModelSpec:
    """How one named model is counted and timed, and what its numbers include."""

    name: str
    title: str
    calls: Callable[[nn.Module, torch.Tensor], list[Call]]
    mergeable_lora: bool  # True: LoRA folded into base weights for deployment (MACs exclude it, timed merged)
    modulated_lora: bool  # True: LoRA A output mixed by an input-dependent r x r matrix (S3Diff)
    includes: str
    kind: str = "teacher"  # teacher, student or part (compress.families.models())
    target: Any = None     # a compress.targets.Target that builds it (None: compress.families.build(name))

    def build(self, size: str, device: Any) -> nn.Module:
        if self.target is not None:
            return self.target.build(size, device)
        from compress.families import build

        return build(self.name, size, device)


ADCSR_INCLUDES = ("PixelUnshuffle(2) -> pruned condition-free UNet (no text, no time) -> half-width VAE "
                  "decoder from its mid-block on (the 'half-decoder'); no VAE encoder, no text encoder, "
                  "no prompt extractor; colour match (elementwise, not counted).")


def model_spec(name: str) -> ModelSpec:
    """A family's teacher: its :meth:`pipeline_spec`; a compressed model: its forward. ``name``: a
    model name or an adc run directory (:func:`compress.targets.resolve`)."""
    from compress.families import get
    from compress.targets import resolve

    t = resolve(name)
    if t.kind == "teacher":
        p = get(t.family).pipeline_spec()
        title = p.title if t.run_dir is None else f"{t.run_dir.name} ({p.title})"
        return ModelSpec(name, title, p.calls, p.mergeable_lora, p.modulated_lora, p.includes, "teacher",
                         t if t.run_dir is not None else None)
    if t.student_dir is not None:
        return ModelSpec(name, t.label, _adcsr_calls, False, False,
                         f"the run's student as saved in {t.student_dir}: PixelUnshuffle -> its UNet -> its decoder "
                         "from the mid-block on; colour match (elementwise, not counted).", "student", t)
    return ModelSpec(name, "AdcSR" if name == "adcsr" else name, _adcsr_calls, False, False,
                     ADCSR_INCLUDES if name == "adcsr" else "the forward", t.kind)


def _anchor(names) -> str | None:
    """The compressed model the teachers are compared with: AdcSR, else the first student named."""
    if "adcsr" in names:
        return "adcsr"
    return next((n for n in names if SPECS[n].kind == "student"), None)


def _teachers(names) -> list[str]:
    return [n for n in names if SPECS[n].kind == "teacher"]


SPECS: dict[str, ModelSpec] = {name: model_spec(name) for name in MODEL_ORDER}


# ---------------------------------------------------------------------------------------------
# Reference numbers (gathered in ../shared/reference/models.md §1.4, §3.1)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """One reference number. ``value`` is a string so its printed precision sets the rounding slack."""

    model: str
    component: str  # "(total)" or component names joined by "+"
    quantity: str  # params_M, params_base_M, params_lora_M, macs_conv_linear_G, macs_attention_G, macs_total_G
    value: str
    tolerance_pct: float | None  # None: an approximate (≈) reference, reported without pass/fail
    note: str = ""

    @property
    def number(self) -> float:
        return float(self.value)

    @property
    def slack(self) -> float:
        """Half a unit of the last printed digit: 2.63 M is anything in [2.625, 2.635)."""
        decimals = len(self.value.split(".")[1]) if "." in self.value else 0
        return 0.5 * 10 ** -decimals


P, B, L = "params_M", "params_base_M", "params_lora_M"
CL, ATT, TOT = "macs_conv_linear_G", "macs_attention_G", "macs_total_G"
REFERENCE: tuple[Ref, ...] = (
    Ref("adcsr", "(total)", P, "456.07", 0.1),
    Ref("adcsr", "(total)", CL, "494.97", 1.0),
    Ref("adcsr", "(total)", TOT, "549.50", 1.0),
    Ref("adcsr", "unet", P, "443.70", 0.1),
    Ref("adcsr", "decoder.mid_block", P, "2.63", 0.1),
    Ref("adcsr", "decoder.up", P, "9.75", 0.1),
    Ref("adcsr", "unet", CL, "184.74", 1.0),
    Ref("adcsr", "unet", ATT, "45.94", 1.0),
    Ref("adcsr", "decoder.mid_block+decoder.up", CL, "310.3", 1.0, "≈ in the reference"),
    Ref("adcsr", "decoder.mid_block+decoder.up", ATT, "8.6", 1.0),
    Ref("osediff", "(total)", P, "1765.3", 0.1),
    Ref("osediff", "(total)", CL, "2298.8", 1.0, "≈ in the reference"),
    Ref("osediff", "(total)", TOT, "2396", None, "≈; reference leaves out RAM Swin-L window attention"),
    Ref("osediff", "unet", B, "865.91", 0.1),
    Ref("osediff", "vae.encoder+vae.decoder", B, "83.65", 0.1),
    Ref("osediff", "text_encoder", P, "340.39", 0.1),
    Ref("osediff", "prompt_extractor", P, "470.93", 0.1),
    Ref("osediff", "unet+vae.encoder", L, "4.43", 0.1),
    Ref("osediff", "unet", CL, "339.1", 1.0),
    Ref("osediff", "unet", ATT, "63.0", 1.0),
    Ref("osediff", "vae.encoder", CL, "541.2", 1.0),
    Ref("osediff", "vae.encoder", ATT, "17.2", 1.0),
    Ref("osediff", "vae.decoder", CL, "1240.1", 1.0),
    Ref("osediff", "vae.decoder", ATT, "17.2", 1.0),
    Ref("osediff", "text_encoder", CL, "22.3", 1.0),
    Ref("osediff", "prompt_extractor", CL, "156.2", 1.0, "tag path at 384 px"),
    Ref("s3diff", "(total)", P, "1326.8", None, "≈"),
    Ref("s3diff", "de_net", P, "2.35", None),
    Ref("s3diff", "guidance", P, "0.55", None, "MLPs + embeddings"),
    Ref("s3diff", "unet", L, "32.43", None),
    Ref("s3diff", "vae.encoder", L, "1.48", None),
    Ref("s3diff", "de_net", CL, "20", None, "≈ at a 128² LR"),
    Ref("s3diff", "(total)", "macs_no_lora_G", "2684", None,
        "≈ '2684 G + LoRA overhead'; matches conv+linear + attention without the LoRA path"),
)


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------


def _component_paths(model: nn.Module) -> dict[str, list[str]]:
    from compress.profile.pipeline import component_paths

    return component_paths(model)


def pipeline_calls(spec: ModelSpec, model: nn.Module, lr: torch.Tensor) -> list[Call]:
    return spec.calls(model, lr)


def count_model(spec: ModelSpec, size: str = "full", lr_size: int = 128, model: nn.Module | None = None) -> ModelCounts:
    """Params (per component) and MACs of the whole pipeline at ``lr_size`` -> 4 x ``lr_size``, on meta."""
    if model is None:
        model = spec.build(size, "meta")
    return count_pipeline(spec, model, lr_size, spec.name, size)


# ---------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------


class _Pipeline:
    """The counted pipeline as one callable; records per-call wall/CPU time and per-component time.

    Per-component times come from forward pre/post hooks on the component modules (host clock,
    so only meaningful on CPU, where execution is synchronous).
    """

    def __init__(self, calls: list[Call], model: nn.Module, per_component: bool):
        self.calls = calls
        self.records: list[dict[str, float]] = []
        self._cur: dict[str, float] | None = None
        self._start: dict[str, float] = {}
        self._handles = []
        if per_component:
            for comp, prefixes in _component_paths(model).items():
                for pre in prefixes:
                    mod = model.get_submodule(pre)
                    self._handles.append(mod.register_forward_pre_hook(self._pre(comp, pre)))
                    self._handles.append(mod.register_forward_hook(self._post(comp, pre)))

    def _pre(self, comp: str, path: str):
        def hook(module, inputs):
            self._start[path] = time.perf_counter()

        return hook

    def _post(self, comp: str, path: str):
        def hook(module, inputs, output):
            if self._cur is not None and path in self._start:
                self._cur[comp] = self._cur.get(comp, 0.0) + (time.perf_counter() - self._start.pop(path)) * 1e3

        return hook

    def __call__(self) -> Any:
        self._cur = {}
        w0, c0 = time.perf_counter(), time.process_time()
        out = None
        for _, fn, args in self.calls:
            out = fn(*args)
        self._cur["(wall)"] = (time.perf_counter() - w0) * 1e3
        self._cur["(cpu)"] = (time.process_time() - c0) * 1e3
        self.records.append(self._cur)
        self._cur = None
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class ModelLatency:
    """Timed calls of one model (same pipeline as counted), with the load it ran under."""

    model: str
    lr_size: int
    times_ms: list[float]
    component_ms: dict[str, float]  # per component, in the timed call with the (lower) median wall time
    cpu_share: float  # process CPU time / (wall x torch threads) over the timed calls
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    build_s: float
    first: LatencyReport  # warm-up + memory + first timed call: device name, peak memory, settings
    rounds: list[int] = field(default_factory=list)  # round index of each timed call

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def mid_ms(self) -> float:
        """Wall time of the call the per-component times come from (the lower median)."""
        return sorted(self.times_ms)[(len(self.times_ms) - 1) // 2]

    @property
    def quartiles(self) -> tuple[float, float]:
        if len(self.times_ms) < 2:
            return self.times_ms[0], self.times_ms[0]
        q1, _, q3 = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q1, q3


class _Timed:
    """One model under timing: its pipeline, its calls so far, and the load it saw."""

    def __init__(self, spec: ModelSpec, size: str, lr_size: int, device: str, dtype: str):
        from compress.zoo.lora import merge_and_unload

        t0 = time.perf_counter()
        self.spec = spec
        self.model = spec.build(size, device)
        if spec.mergeable_lora:
            merge_and_unload(self.model)
        self.build_s = time.perf_counter() - t0
        self.device, self.dtype = device, dtype
        lr = torch.rand(1, 3, lr_size, lr_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.lr = lr.to(device=device, dtype=_TORCH_DT[dtype])  # measure_latency casts the module, not closures
        self.lr_size = lr_size
        self.pipe = _Pipeline(pipeline_calls(spec, self.model, self.lr), self.model,
                              per_component=torch.device(device).type == "cpu")
        self.first: LatencyReport | None = None
        self.timed: list[dict[str, float]] = []
        self.rounds: list[int] = []
        self.load_before = os.getloadavg()

    def _measure(self, warmup: int, memory: bool) -> LatencyReport:
        before = len(self.pipe.records)
        rep = measure_latency(self.pipe, device=self.device, module=self.model, warmup=warmup, repeats=1,
                              dtype=self.dtype, measure_memory=memory)
        self.timed.append(self.pipe.records[-1])
        assert len(self.pipe.records) == before + warmup + int(memory) + 1
        return rep

    def start(self, warmup: int) -> None:
        """``warmup`` untimed calls (the last one measures peak memory), then the first timed call."""
        self.first = self._measure(max(warmup - 1, 0), memory=warmup > 0)
        self.rounds.append(0)

    def again(self, round_index: int) -> None:
        self._measure(0, memory=False)
        self.rounds.append(round_index)

    def result(self) -> ModelLatency:
        seen = {k for r in self.timed for k in r if not k.startswith("(")}
        comps = [c for c in self.model.components() if c in seen]  # pipeline order, as the tables
        # the components of the median call itself (lower median), so the stack adds up to a real call
        walls = [r["(wall)"] for r in self.timed]
        mid = sorted(range(len(walls)), key=walls.__getitem__)[(len(walls) - 1) // 2]
        comp_ms = {c: self.timed[mid].get(c, 0.0) for c in comps}
        wall = sum(r["(wall)"] for r in self.timed)
        cpu = sum(r["(cpu)"] for r in self.timed)
        return ModelLatency(self.spec.name, self.lr_size, [r["(wall)"] for r in self.timed], comp_ms,
                            cpu / wall / torch.get_num_threads() if wall else 0.0, self.load_before,
                            os.getloadavg(), self.build_s, self.first, list(self.rounds))

    def close(self) -> None:
        self.pipe.close()
        del self.model, self.pipe
        gc.collect()


def time_models(names: list[str], size: str, lr_size: int, device: str, dtype: str, warmup: int, repeats: int,
                log: Callable[[str], None] = lambda s: None) -> dict[str, ModelLatency]:
    """Time each model's pipeline; AdcSR stays loaded and is timed in alternation with each other model.

    One teacher at a time is in memory (full-size OSEDiff fp32 is ~7 GB). In round i every loaded
    model runs once, so AdcSR and the teacher of that round share the machine's load; the
    teacher/AdcSR ratio is the median of the per-round ratios.
    """
    out: dict[str, ModelLatency] = {}
    anchor = _anchor(names)
    base: _Timed | None = None
    if anchor:
        log(f"building {anchor} ({size}) on {device}")
        base = _Timed(SPECS[anchor], size, lr_size, device, dtype)
        base.start(warmup)
    next_round = 1
    try:
        for name in [n for n in names if n != anchor]:
            log(f"building {name} ({size}) on {device}")
            t = _Timed(SPECS[name], size, lr_size, device, dtype)
            try:
                t.start(warmup)
                if base is not None:
                    base.again(next_round)
                    t.rounds[-1] = next_round
                    next_round += 1
                for _ in range(repeats - 1):
                    if base is not None:
                        base.again(next_round)
                    t.again(next_round)
                    next_round += 1
                out[name] = t.result()
                log(f"  {name}: median {out[name].median_ms:.0f} ms over {len(out[name].times_ms)} calls")
            finally:
                t.close()
        if base is not None:
            for _ in range(max(0, repeats - len(base.timed))):  # AdcSR alone was asked for
                base.again(next_round)
                next_round += 1
            out[anchor] = base.result()
            log(f"  {anchor}: median {out[anchor].median_ms:.0f} ms over {len(out[anchor].times_ms)} calls")
    finally:
        if base is not None:
            base.close()
    return {n: out[n] for n in names if n in out}


def paired_ratio(teacher: ModelLatency, anchor: ModelLatency) -> float | None:
    """Median over rounds of teacher / AdcSR, using only rounds in which both ran."""
    a = dict(zip(anchor.rounds, anchor.times_ms))
    ratios = [t / a[r] for r, t in zip(teacher.rounds, teacher.times_ms) if r in a]
    return statistics.median(ratios) if ratios else None


# ---------------------------------------------------------------------------------------------
# The whole comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class CompareOptions:
    lr_size: int = 128
    latency_size: int = 64
    device: str = "cpu"
    dtype: str = "fp32"
    out: str = "adc-compare"
    size: str = "full"
    models: tuple[str, ...] = MODEL_ORDER
    warmup: int = 1
    repeats: int = 3
    latency: bool = True
    threads: int = 1  # torch intra-op threads for the timed runs; 0 = torch's default
    plugins: tuple[str, ...] = ()  # modules that register model families, imported first

    def check(self) -> None:
        for name, v in (("--lr-size", self.lr_size), ("--latency-size", self.latency_size)):
            if v < 16 or v % 16:
                raise AdcError(f"{name} {v}: expected a multiple of 16 (AdcSR's unshuffle x 3 downsamplers), >= 16")
        if self.size not in ("full", "tiny"):
            raise AdcError(f"--size {self.size!r}: expected full or tiny")
        if not self.models:
            raise AdcError("--models: expected model names (adc families) or run directories, comma-separated")
        from compress.families import load_plugins

        load_plugins(list(self.plugins), "--plugin")
        for m in self.models:  # a name of the registry (plugins included) or a run directory
            if m not in SPECS:
                try:
                    SPECS[m] = model_spec(m)
                except AdcError as exc:
                    raise AdcError(f"--models {m}: {exc}") from None
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise AdcError(f"--dtype {self.dtype!r}: expected fp32, bf16 or fp16")
        if self.threads < 0:
            raise AdcError(f"--threads {self.threads}: expected >= 1, or 0 for torch's default")
        if self.warmup < 0 or self.repeats < 1:
            raise AdcError(f"--warmup {self.warmup} / --repeats {self.repeats}: expected >= 0 / >= 1")


@dataclass
class CompareResult:
    options: CompareOptions
    counts: dict[str, ModelCounts]
    counts_at_latency: dict[str, ModelCounts]
    latency: dict[str, ModelLatency]
    command: str
    started: str
    seconds: float = 0.0
    env: dict[str, str] = field(default_factory=dict)


def _env() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def v(d: str) -> str:
        try:
            return version(d)
        except PackageNotFoundError:
            return "-"

    return {"torch": torch.__version__, "diffusers": v("diffusers"), "transformers": v("transformers"),
            "peft": v("peft"), "python": platform.python_version(), "host_cpus": str(os.cpu_count())}


@contextlib.contextmanager
def _num_threads(n: int):
    """torch intra-op threads for the block, restored after (0: leave torch's setting).

    Why 1 by default: on a shared, oversubscribed CPU, OpenMP threads wait on each other at every
    op's barrier; here 2 threads ran AdcSR 5x slower than 1 while other jobs were running.
    """
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_compare(opts: CompareOptions, command: str, log: Callable[[str], None] = lambda s: None) -> CompareResult:
    opts.check()
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    counts, small = {}, {}
    for name in opts.models:
        log(f"counting {name} ({opts.size}) on meta at LR {opts.lr_size}")
        model = SPECS[name].build(opts.size, "meta")
        counts[name] = count_model(SPECS[name], opts.size, opts.lr_size, model)
        if opts.latency and opts.latency_size != opts.lr_size:
            small[name] = count_model(SPECS[name], opts.size, opts.latency_size, model)
        del model
    lat = {}
    if opts.latency:
        with _num_threads(opts.threads):
            lat = time_models(list(opts.models), opts.size, opts.latency_size, opts.device, opts.dtype, opts.warmup,
                              opts.repeats, log)
    res = CompareResult(opts, counts, small or counts, lat, command, started, env=_env())
    res.seconds = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------



def _res(lr: int) -> str:
    return f"LR {lr}x{lr} -> SR {4 * lr}x{4 * lr}, batch 1"


def _measured(c: ModelCounts, ref: Ref) -> float | None:
    t = c.table
    comps = list(t.index) if ref.component == "(total)" else ref.component.split("+")
    if any(x not in t.index for x in comps):
        return None
    s = t.loc[comps].sum()
    q = ref.quantity
    if q == P:
        return s["params"] / 1e6
    if q == B:
        return (s["params"] - s["params_lora"]) / 1e6
    if q == L:
        return s["params_lora"] / 1e6
    if q == CL:
        return s["macs_conv_linear"] / 1e9
    if q == ATT:
        return s["macs_attention"] / 1e9
    if q == TOT:
        return s["macs_total"] / 1e9
    if q == "macs_no_lora_G":
        return (s["macs_total"] - s["macs_lora"]) / 1e9
    raise AdcError(f"unknown reference quantity {q!r}")


def reference_table(res: CompareResult) -> pd.DataFrame:
    """Measured vs reference, with % difference and pass/fail (full size at LR 128 only)."""
    rows = []
    if res.options.size != "full" or res.options.lr_size != 128:
        return pd.DataFrame(rows)
    for ref in REFERENCE:
        if ref.model not in res.counts:
            continue
        m = _measured(res.counts[ref.model], ref)
        if m is None:
            continue
        diff = (m - ref.number) / ref.number * 100
        if ref.tolerance_pct is None:
            status = "≈ (no tolerance)"
        else:
            ok = abs(m - ref.number) <= max(ref.tolerance_pct / 100 * ref.number, ref.slack)
            status = f"{'ok' if ok else 'FAIL'} (±{ref.tolerance_pct:g} %)"
        unit = "M" if ref.quantity.startswith("params") else "G"
        rows.append({"model": SPECS[ref.model].title, "component": ref.component, "quantity": ref.quantity,
                     "measured": round(m, 3), "reference": ref.value, "unit": unit, "diff_%": round(diff, 3),
                     "check": status, "note": ref.note})
    return pd.DataFrame(rows)


def _reduction(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f} %" if b else "-"


def reductions_table(res: CompareResult) -> pd.DataFrame:
    """AdcSR (or the first student named) relative to each teacher: params, MACs, latency (negative = smaller)."""
    anchor = _anchor(res.options.models)
    if anchor is None or anchor not in res.counts:
        return pd.DataFrame()
    a = res.counts[anchor].total
    rows = []
    for t in _teachers(res.options.models):
        if t not in res.counts:
            continue
        b = res.counts[t].total
        row = {f"{SPECS[anchor].title} vs": SPECS[t].title,
               "params": _reduction(a["params"], b["params"]),
               "MACs conv+linear": _reduction(a["macs_conv_linear"], b["macs_conv_linear"]),
               "MACs incl. attention": _reduction(a["macs_total"], b["macs_total"])}
        if t in res.latency and anchor in res.latency:
            ratio = paired_ratio(res.latency[t], res.latency[anchor])
            row["CPU latency"] = _reduction(1.0, ratio) if ratio else "-"
            row[f"{SPECS[t].title}/{SPECS[anchor].title} time (paired)"] = f"{ratio:.2f}x" if ratio else "-"
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt_df(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in r.tolist()) + " |")
    return "\n".join(lines) + "\n"


def _ms(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _load_str(lat: ModelLatency) -> str:
    return (f"load avg (1/5/15 min) {lat.load_before[0]:.1f}/{lat.load_before[1]:.1f}/{lat.load_before[2]:.1f} before, "
            f"{lat.load_after[0]:.1f}/{lat.load_after[1]:.1f}/{lat.load_after[2]:.1f} after; "
            f"this process got {lat.cpu_share * 100:.0f} % of its {lat.first.num_threads} thread(s)' CPU time")


def render_markdown(res: CompareResult) -> str:
    o = res.options
    any_counts = next(iter(res.counts.values()))
    counter = f"{COUNTER} (torch {any_counts.counter_version}), meta tensors, {any_counts.dtype}"
    lab_mac = f"{counter}, {_res(o.lr_size)}"
    lat_dev = next(iter(res.latency.values())).first.device_name if res.latency else "-"
    lab_lat = f"{o.device} ({lat_dev}), {_DT[o.dtype]}, {_res(o.latency_size)}"
    titles = [SPECS[m].title for m in o.models]
    L_ = []
    L_.append(f"Generated by: `{res.command}` (started {res.started}, took {res.seconds:.0f} s)\n")
    L_.append(f"# Complexity: {' vs '.join(titles)}\n")
    L_.append(f"Models: `{o.size}` size, random init (no weights). "
              + ", ".join(f"{k} {v}" for k, v in res.env.items()) + ".\n")
    if o.size != "full":
        L_.append("**Tiny models (a smoke run): the numbers are not the real models' numbers.**\n")

    # ---- totals
    rows = []
    for m in o.models:
        t = res.counts[m].total
        row = {"model": SPECS[m].title,
               "params (M)": f"{t['params'] / 1e6:.2f}",
               "of which LoRA (M)": f"{t['params_lora'] / 1e6:.2f}",
               f"MACs conv+linear (G) @{o.lr_size}->{4 * o.lr_size}": f"{t['macs_conv_linear'] / 1e9:.2f}",
               f"MACs attention (G) @{o.lr_size}->{4 * o.lr_size}": f"{t['macs_attention'] / 1e9:.2f}",
               f"MACs total (G) @{o.lr_size}->{4 * o.lr_size}": f"{t['macs_total'] / 1e9:.2f}"}
        if res.latency:
            lat = res.latency.get(m)
            tl = res.counts_at_latency[m].total
            key = f"{o.device} {o.dtype} latency (ms) @{o.latency_size}->{4 * o.latency_size}"
            row[f"MACs total (G) @{o.latency_size}->{4 * o.latency_size}"] = f"{tl['macs_total'] / 1e9:.2f}"
            if lat:
                q1, q3 = lat.quartiles
                row[key + ", median [IQR]"] = f"{_ms(lat.median_ms)} [{_ms(q1)}-{_ms(q3)}]"
                row["GMAC/s achieved"] = f"{tl['macs_total'] / 1e6 / lat.median_ms:.1f}"
        rows.append(row)
    L_.append("## 1. Totals\n")
    L_.append(_fmt_df(pd.DataFrame(rows)))
    L_.append(f"\nLegend. Params: unique parameters of the full pipeline as loaded (LoRA unmerged), counted on "
              f"meta. MACs: {lab_mac}; 1 MAC = 2 FLOPs; mergeable LoRA excluded (merged), S3Diff's modulated "
              f"LoRA included; norms, activations, softmax and resampling not counted."
              + (f" Latency: {lab_lat}; the same pipeline that is counted (LoRA merged where mergeable), "
                 f"{o.warmup} warm-up call(s), median and IQR of the timed calls, per-model counts below." if res.latency else "")
              + "\n")

    # ---- reductions
    red = reductions_table(res)
    anchor = _anchor(o.models)
    if not red.empty:
        a_title = SPECS[anchor].title
        L_.append(f"\n## 2. {a_title} relative to the teachers\n")
        L_.append(_fmt_df(red))
        L_.append(f"\nLegend. Params/MACs as in §1 ({lab_mac}). "
                  + (f"Latency: {lab_lat}; the ratio is the median over rounds of teacher/{a_title} from calls "
                     f"made back to back in the same run (same load)." if res.latency else "")
                  + (" Expected from the AdcSR paper: -74 % params, -78 % MACs vs OSEDiff." if anchor == "adcsr" else "")
                  + "\n")

    # ---- reference
    ref = reference_table(res)
    # the reference numbers were gathered from the official code and papers (``REFERENCE`` above);
    # the report names where they live in the repo, not a folder of this machine
    L_.append("\n## 3. Measured vs reference (`REFERENCE` in profiling/compare.py: counts of the official "
              "models, gathered from their code and papers)\n")
    if ref.empty:
        L_.append("_Reference checks apply to `--size full --lr-size 128` only._\n")
    else:
        L_.append(_fmt_df(ref))
        L_.append(f"\nLegend. Measured: {lab_mac}; params on meta. Quantities: params_M total, params_base_M "
                  f"without LoRA, params_lora_M LoRA only, macs_*_G as in §1 (macs_no_lora_G: total without the "
                  f"LoRA path). A check passes within the tolerance or half a unit of the reference's last digit.\n")

    # ---- per component
    L_.append("\n## 4. Per component\n")
    for m in o.models:
        c = res.counts[m]
        lat = res.latency.get(m)
        rows = []
        for comp, r in c.table.iterrows():
            row = {"component": comp, "params (M)": f"{r['params'] / 1e6:.2f}",
                   "LoRA params (M)": f"{r['params_lora'] / 1e6:.2f}",
                   "MACs conv+linear (G)": f"{r['macs_conv_linear'] / 1e9:.2f}",
                   "LoRA path MACs (G)": f"{r['macs_lora'] / 1e9:.2f}",
                   "MACs attention (G)": f"{r['macs_attention'] / 1e9:.2f}",
                   "MACs total (G)": f"{r['macs_total'] / 1e9:.2f}"}
            if lat is not None and lat.component_ms:
                row[f"latency (ms) @{o.latency_size}"] = _ms(lat.component_ms.get(comp, 0.0)) if comp in lat.component_ms else "-"
            rows.append(row)
        if lat is not None and lat.component_ms:
            rest = lat.mid_ms - sum(lat.component_ms.values())
            rows.append({"component": "(rest: resampling, glue; latency only)", f"latency (ms) @{o.latency_size}": _ms(max(rest, 0.0))})
        L_.append(f"\n**{SPECS[m].title}** — pipeline calls counted: {', '.join(c.calls)}.\n\n")
        L_.append(_fmt_df(pd.DataFrame(rows).fillna("")))
    lora_note = ("LoRA path MACs: the unmerged LoRA A/B products (OSEDiff, DAPE: excluded from conv+linear, since "
                 "deployed merged; S3Diff: included, with the r x r de_mod mix, which the counter scores as "
                 "attention and which is moved to conv+linear here).")
    L_.append(f"\nLegend. Params on meta; MACs: {lab_mac}. {lora_note}"
              + (f" Per-component latency: {lab_lat}, host-clock forward hooks on each component's modules, "
                 f"taken from the timed call with the median wall time (rest = that call minus its components)."
                 if res.latency else "") + "\n")

    # ---- what is counted
    L_.append("\n## 5. What each model's count includes\n")
    for m in o.models:
        L_.append(f"- **{SPECS[m].title}**: {SPECS[m].includes}")
    L_.append("")

    # ---- latency details
    if res.latency:
        L_.append("\n## 6. Latency runs and machine load\n")
        L_.append(f"Timed on {o.device}: {lat_dev}; {_DT[o.dtype]}; {_res(o.latency_size)}; full pipeline per call "
                  f"(as counted). Per model: {o.warmup} untimed warm-up call(s) (the last measures peak RSS), then "
                  f"timed calls; AdcSR stays loaded and runs once in every round next to the teacher of that "
                  f"round (one teacher in memory at a time). The machine is shared and busy: absolute times are "
                  f"noisy, the paired ratios less so. Peak RSS is the whole process at the warm-up call: a "
                  f"teacher's includes the AdcSR weights held alongside (~1.8 GB in fp32).\n")
        rows = []
        for m, lat in res.latency.items():
            q1, q3 = lat.quartiles
            mem = lat.first.peak_memory_bytes
            rows.append({"model": SPECS[m].title, "calls": len(lat.times_ms),
                         "times (ms)": ", ".join(_ms(t) for t in lat.times_ms),
                         "median (ms)": _ms(lat.median_ms), "IQR (ms)": f"{_ms(q1)}-{_ms(q3)}",
                         "peak RSS (GiB)": f"{mem / 2**30:.2f}" if mem else "-",
                         "build (s)": f"{lat.build_s:.0f}", "load note": _load_str(lat)})
        L_.append(_fmt_df(pd.DataFrame(rows)))
        if anchor in res.latency:
            for t in _teachers(o.models):
                if t in res.latency:
                    r = paired_ratio(res.latency[t], res.latency[anchor])
                    ct, ca = res.counts_at_latency[t].total, res.counts_at_latency[anchor].total
                    L_.append(f"\n- {SPECS[t].title}/{SPECS[anchor].title} latency ratio (same run, paired rounds): "
                              f"**{r:.2f}x**; MAC ratio at the same size: {ct['macs_total'] / ca['macs_total']:.2f}x.")
        first = next(iter(res.latency.values())).first
        L_.append(f"\nLegend. {lab_lat}; timer {first.timer}; torch threads {first.num_threads} (--threads "
                  f"{o.threads}: on this shared CPU one thread is several times faster than two, as the "
                  f"threads wait on each other at every op while other jobs run).\n")
    L_.append("\n![params, MACs and latency per model, stacked by component](complexity.png)\n")
    return "\n".join(L_)


def tidy_table(res: CompareResult) -> pd.DataFrame:
    """One row per number with its labels (the CSV)."""
    o = res.options
    rows = []
    base = {"size": o.size}

    def add(model, comp, quantity, value, unit, device, dtype, resolution, counter):
        rows.append({"model": model, "component": comp, "quantity": quantity, "value": value, "unit": unit,
                     "device": device, "dtype": dtype, "resolution": resolution, "counter": counter, **base})

    for m, c in res.counts.items():
        cnt = f"{COUNTER} (torch {c.counter_version})"
        for comp, r in list(c.table.iterrows()) + [("(total)", c.total)]:
            add(m, comp, "params", int(r["params"]), "count", "meta", c.dtype, "-", "unique parameters")
            add(m, comp, "params_lora", int(r["params_lora"]), "count", "meta", c.dtype, "-", "unique parameters")
            for q in ("macs_conv_linear", "macs_lora", "macs_attention", "macs_total"):
                add(m, comp, q, int(r[q]), "MACs", "meta", c.dtype, _res(c.lr_size), cnt)
        if res.counts_at_latency is not res.counts and m in res.counts_at_latency:
            tl = res.counts_at_latency[m].total
            add(m, "(total)", "macs_total", int(tl["macs_total"]), "MACs", "meta", c.dtype, _res(o.latency_size), cnt)
    for m, lat in res.latency.items():
        dev = f"{o.device} ({lat.first.device_name})"
        q1, q3 = lat.quartiles
        timer = lat.first.timer
        for q, v in (("latency_median", lat.median_ms), ("latency_q1", q1), ("latency_q3", q3),
                     ("latency_min", min(lat.times_ms)), ("latency_max", max(lat.times_ms))):
            add(m, "(total)", q, round(v, 3), "ms", dev, _DT[o.dtype], _res(o.latency_size), timer)
        add(m, "(total)", "latency_calls", len(lat.times_ms), "count", dev, _DT[o.dtype], _res(o.latency_size), timer)
        for comp, v in lat.component_ms.items():
            add(m, comp, "latency_in_median_call", round(v, 3), "ms", dev, _DT[o.dtype], _res(o.latency_size),
                "forward hooks, host clock")
        if lat.first.peak_memory_bytes:
            add(m, "(total)", "peak_memory", lat.first.peak_memory_bytes, "bytes", dev, _DT[o.dtype],
                _res(o.latency_size), lat.first.peak_memory_method)
        add(m, "(total)", "cpu_share", round(lat.cpu_share, 3), "fraction", dev, _DT[o.dtype], _res(o.latency_size),
            "process CPU time / (wall x torch threads)")
        add(m, "(total)", "load_avg_1min_before", lat.load_before[0], "load", dev, "-", "-", "os.getloadavg")
        add(m, "(total)", "load_avg_1min_after", lat.load_after[0], "load", dev, "-", "-", "os.getloadavg")
    anchor = _anchor(o.models)
    if anchor in res.counts:
        a = res.counts[anchor].total
        for t in _teachers(o.models):
            if t not in res.counts:
                continue
            b = res.counts[t].total
            cnt = f"{COUNTER} (torch {res.counts[t].counter_version})"
            add(f"{anchor}_vs_{t}", "(total)", "params_change", round((a["params"] / b["params"] - 1) * 100, 3), "%",
                "meta", res.counts[t].dtype, "-", "unique parameters")
            for q in ("macs_conv_linear", "macs_total"):
                add(f"{anchor}_vs_{t}", "(total)", f"{q}_change", round((a[q] / b[q] - 1) * 100, 3), "%", "meta",
                    res.counts[t].dtype, _res(o.lr_size), cnt)
            if t in res.latency and anchor in res.latency:
                r = paired_ratio(res.latency[t], res.latency[anchor])
                if r:
                    add(f"{t}_over_{anchor}", "(total)", "latency_ratio_paired", round(r, 4), "x",
                        f"{o.device} ({res.latency[t].first.device_name})", _DT[o.dtype], _res(o.latency_size),
                        res.latency[t].first.timer)
    return pd.DataFrame(rows, dtype=object)  # object: counts stay integers in the CSV


_COLORS = {
    "prompt_extractor": "#8c564b", "text_encoder": "#e377c2", "de_net": "#7f7f7f", "guidance": "#bcbd22",
    "vae.encoder": "#1f77b4", "unet": "#ff7f0e", "vae.decoder": "#2ca02c", "decoder.mid_block": "#17becf",
    "decoder.up": "#98df8a", "(outside components)": "#c7c7c7", "(rest)": "#d9d9d9", "attention": "#ffffff",
}


def plot_png(res: CompareResult, path: str | os.PathLike) -> Path:
    """Params / MACs / latency bars per model, stacked by component (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    o = res.options
    models = list(o.models)
    titles = [SPECS[m].title for m in models]
    panels = 3 if res.latency else 2
    fig = Figure(figsize=(5.2 * panels, 5.6))
    axes = fig.subplots(1, panels)
    seen: dict[str, Any] = {}

    def stack(ax, values: dict[str, dict[str, float]], hatch_key: str | None = None,
              labels: dict[str, float] | None = None):
        for i, m in enumerate(models):
            bottom = 0.0
            for comp, v in values.get(m, {}).items():
                if v <= 0:
                    continue
                is_att = comp == hatch_key
                color = _COLORS.get(comp, "#aec7e8")
                bar = ax.bar(i, v, bottom=bottom, color=color, edgecolor="black", linewidth=0.4,
                             hatch="///" if is_att else None)
                seen.setdefault(comp, bar)
                bottom += v
            if m not in values:
                continue
            top = labels[m] if labels and m in labels else bottom
            ax.text(i, bottom, f"{top:,.0f}" if top >= 100 else f"{top:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(models)), titles)

    cnt = next(iter(res.counts.values()))
    params = {m: {k: r["params"] / 1e6 for k, r in res.counts[m].table.iterrows()} for m in models}
    stack(axes[0], params)
    axes[0].set_title(f"Params (M), full pipeline\n{o.size} size, counted on meta", fontsize=9)
    macs = {}
    for m in models:
        t = res.counts[m].table
        d = {k: r["macs_conv_linear"] / 1e9 for k, r in t.iterrows()}
        d["attention"] = t["macs_attention"].sum() / 1e9
        macs[m] = d
    stack(axes[1], macs, hatch_key="attention")
    axes[1].set_title(f"MACs (G) at LR {o.lr_size}->{4 * o.lr_size}, conv+linear + attention (hatched)\n"
                      f"FlopCounterMode (torch {cnt.counter_version}), meta, {cnt.dtype}", fontsize=9)
    if res.latency:
        lat = {}
        for m in models:
            if m not in res.latency:
                continue
            L = res.latency[m]
            d = dict(L.component_ms)
            d["(rest)"] = max(L.mid_ms - sum(d.values()), 0.0)
            lat[m] = d
        stack(axes[2], lat, labels={m: res.latency[m].median_ms for m in lat})
        first = next(iter(res.latency.values())).first
        dev = first.device_name.split(" (")[0]
        axes[2].set_title(f"{o.device.upper()} latency (ms) at LR {o.latency_size}->{4 * o.latency_size}, {_DT[o.dtype]}\n"
                          f"{dev[:28]}, {first.num_threads} thread(s), shared; label: median call", fontsize=9)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles = [Patch(facecolor=_COLORS.get(k, "#aec7e8"), edgecolor="black", hatch="///" if k == "attention" else None,
                     label=k) for k in seen]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(f"{' vs '.join(titles)}: random-init {o.size}-size models, batch 1", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def write_reports(res: CompareResult, out: str | os.PathLike) -> dict[str, Path]:
    out = Path(out)
    md = atomic_write_text(out / "complexity.md", render_markdown(res))
    csv = atomic_write_text(out / "complexity.csv", tidy_table(res).to_csv(index=False))
    png = plot_png(res, out / "complexity.png")
    return {"md": md, "csv": csv, "png": png}


def _parser() -> argparse.ArgumentParser:
    from compress.cli import prog

    p = argparse.ArgumentParser(prog=prog("compare"), description=__doc__.split("\n")[0])
    p.add_argument("--lr-size", type=int_in(8, 8192), default=128, help="LR side for the MAC counts (SR = 4x); reference at 128")
    p.add_argument("--latency-size", type=int_in(8, 8192), default=64, help="LR side for the timed runs (small on CPU)")
    p.add_argument("--device", default="cpu", help="device for the latency runs (cpu, cuda)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="latency dtype")
    p.add_argument("--out", default="adc-compare",
                   help="output folder (default: ./adc-compare; the repo's reports: --out reports/)")
    p.add_argument("--size", default="full", choices=("full", "tiny"), help="model widths (tiny: smoke test)")
    p.add_argument("--models", default=",".join(MODEL_ORDER),
                   help="comma-separated model names (adc families) and/or adc run directories "
                        f"(default {','.join(MODEL_ORDER)})")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (a plugin that registers model families); repeatable")
    p.add_argument("--warmup", type=int_in(0, 1000), default=1, help="untimed calls per model (the last measures peak memory)")
    p.add_argument("--repeats", type=int_in(1, 100000), default=3, help="timed calls per model")
    p.add_argument("--threads", type=int_in(0, 1024), default=1, help="torch threads for the timed runs (0: torch's default)")
    p.add_argument("--no-latency", action="store_true", help="counts only")
    return p


def main(argv: list[str] | None = None) -> int:
    from compress.cli import run_cli

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    a = parser.parse_args(argv)
    opts = CompareOptions(lr_size=a.lr_size, latency_size=a.latency_size, device=a.device, dtype=a.dtype, out=a.out,
                          size=a.size, models=tuple(m.strip() for m in a.models.split(",") if m.strip()),
                          warmup=a.warmup, repeats=a.repeats, latency=not a.no_latency, threads=a.threads,
                          plugins=tuple(a.plugin))
    command = parser.prog + (" " + shlex.join(argv) if argv else "")

    def body() -> int:
        res = run_compare(opts, command, log=lambda s: print(s, file=sys.stderr, flush=True))
        paths = write_reports(res, opts.out)
        print(f"wrote {', '.join(str(p) for p in paths.values())} in {res.seconds:.0f} s")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
