"""``profile``: params, MACs and latency of the teacher and the run's student, in one run.

Counts use the primary counter of :mod:`compress.profile.counters` on ``meta`` (no memory, no
weights needed): the teacher as its family deploys it (:meth:`ModelFamily.pipeline_spec`, e.g.
a prompt extractor's tag path and merged LoRA included), the student's forward. Latency is measured on
the run's device with teacher and student timed alternately, so their ratio is taken under the
same load. Without weights at full size on a CPU, latency is skipped (``latency: auto``): the
structure is the same, and the CPU timing of a 1.7 B model is not what anyone deploys;
``python -m profiling.compare`` and ``profiling/gpu_bench.sh`` do that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import AdcError
from ..log import get_logger
from ..config import ranged

log = get_logger("profile")

COUNTER = "torch.utils.flop_counter.FlopCounterMode on meta (MACs = FLOPs/2)"


@dataclass
class ProfileConfig:
    lr_size: int | None = ranged(None, 16, 8192)            # default: task.lr_size
    latency: Literal["auto", "on", "off"] = "auto"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    warmup: int = ranged(2, 0, 1000)
    repeats: int = ranged(5, 1, 100000)

    def validate(self, path: str) -> None:
        if self.lr_size is not None and (self.lr_size < 16 or self.lr_size % 16):
            raise AdcError(f"{path}.lr_size: {self.lr_size} is not a positive multiple of 16")
        if self.repeats < 1 or self.warmup < 0:
            raise AdcError(f"{path}: repeats must be >= 1 and warmup >= 0")


def teacher_counts(bundle, lr_size: int) -> dict[str, Any]:
    """The teacher pipeline as deployed, counted on meta (the same architecture as the user's weights)."""
    from ..profile.pipeline import count_pipeline

    family = bundle.family
    counts = bundle.cached(("teacher_counts", lr_size), lambda: count_pipeline(
        family.pipeline_spec(), bundle.meta_teacher(), lr_size, family.name, bundle.size, bundle.recipe.task.scale))
    total = counts.total
    return {"model": "teacher", "params": int(total["params"]), "macs_conv_linear": int(total["macs_conv_linear"]),
            "macs_attention": int(total["macs_attention"]), "macs_total": int(total["macs_total"]),
            "macs_lora_unmerged": int(total["macs_lora"]), "calls": counts.calls,
            "components": {k: int(v) for k, v in counts.table["params"].items()}}


def student_counts(student, lr_size: int) -> dict[str, Any]:
    from ..profile.counters import MacCounter, count_params

    lr = torch.zeros(1, 3, lr_size, lr_size)
    report = MacCounter(device="meta", depth=1).count(student, lr)
    params = count_params(student)
    return {"model": "student", "params": int(params["total"]), "macs_conv_linear": int(report.conv_linear),
            "macs_attention": int(report.attention), "macs_total": int(report.total), "macs_lora_unmerged": 0,
            "calls": ["forward"], "components": {k: int(v) for k, v in params["components"].items()}}


def run_profile(bundle, config: ProfileConfig, stage_dir: Path) -> dict[str, Any]:
    from ..profile.latency import measure_latency

    task = bundle.recipe.task
    lr_size = config.lr_size or task.lr_size
    state = bundle.student_state()
    student = state.model
    rows = [teacher_counts(bundle, lr_size), student_counts(student, lr_size)]

    device = bundle.device
    timed = config.latency == "on" or (config.latency == "auto" and (device.type == "cuda" or bundle.size == "tiny"))
    latency: dict[str, Any] = {}
    if timed:
        # random weights when the user has none: timing does not depend on the values
        teacher = bundle.teacher() if bundle.has_teacher_weights() or bundle.size == "tiny" else \
            bundle.family.build_teacher(bundle.size, "cpu", bundle.options)
        if state.on_meta:
            raise AdcError("profile.latency: the student has no weights (a structure-only run); set latency: off")
        lr_real = (torch.rand(1, 3, lr_size, lr_size, generator=torch.Generator().manual_seed(0)) * 2 - 1)
        reports: dict[str, list] = {}
        for round_ in range(2):  # alternate, so both see the same machine load
            for name, model in (("teacher", teacher), ("student", student)):
                log.info(f"profile: latency round {round_ + 1}/2, {name} ({config.repeats} repeats on {device})")
                r = measure_latency(model, device=device, args=(lr_real,), warmup=config.warmup,
                                    repeats=config.repeats, dtype=None if config.dtype == "fp32" else config.dtype,
                                    autocast=config.dtype != "fp32")
                reports.setdefault(name, []).append(r)
        for name, rs in reports.items():
            best = min(rs, key=lambda r: r.median_ms)
            latency[name] = {"median_ms": best.median_ms, "iqr_ms": best.iqr_ms, "device_name": best.device_name,
                             "threads": best.num_threads, "peak_memory_bytes": best.peak_memory_bytes,
                             "peak_memory_method": best.peak_memory_method}
        latency["speedup"] = latency["teacher"]["median_ms"] / latency["student"]["median_ms"]
    for row in rows:
        row["latency_ms"] = latency.get(row["model"], {}).get("median_ms")
    import pandas as pd

    from ..io import atomic_path

    frame = pd.DataFrame([{k: v for k, v in r.items() if k not in ("components", "calls")} for r in rows])
    frame["device_counts"], frame["counter"] = "meta", COUNTER
    frame["lr_size"], frame["sr_size"] = lr_size, lr_size * task.scale
    frame["latency_device"] = str(device) if timed else None
    frame["dtype"] = config.dtype
    with atomic_path(stage_dir / "profile.csv") as tmp:
        frame.to_csv(tmp, index=False)
    return {"rows": rows, "latency": latency, "counter": COUNTER, "lr_size": lr_size, "sr_size": lr_size * task.scale,
            "dtype": config.dtype, "latency_device": str(device) if timed else None,
            "csv": bundle.rel(stage_dir / "profile.csv"),
            "ratios": {"params": rows[1]["params"] / rows[0]["params"],
                       "macs_total": rows[1]["macs_total"] / rows[0]["macs_total"],
                       "macs_conv_linear": rows[1]["macs_conv_linear"] / rows[0]["macs_conv_linear"]}}
