"""``profile``: params, MACs and latency of the teacher and the run's student, in one run.

Counts use the primary counter of :mod:`compress.profile.counters` on ``meta`` (no memory, no weights
needed); latency is measured on the run's device with teacher and student timed alternately so
their ratio is taken under the same load. Without weights at full size on a CPU, latency is
skipped (``latency: auto``): the structure is the same, and the CPU timing of a 1.7 B model is
not what anyone deploys; ``python -m profiling.compare`` and ``profiling/gpu_bench.sh`` do that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import AdcError


@dataclass
class ProfileConfig:
    lr_size: int | None = None            # default: task.lr_size
    latency: Literal["auto", "on", "off"] = "auto"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    warmup: int = 2
    repeats: int = 5

    def validate(self, path: str) -> None:
        if self.lr_size is not None and self.lr_size % 16:
            raise AdcError(f"{path}.lr_size: {self.lr_size} is not a multiple of 16")
        if self.repeats < 1 or self.warmup < 0:
            raise AdcError(f"{path}: repeats must be >= 1 and warmup >= 0")


def run_profile_needs(bundle, config: ProfileConfig) -> list[str]:
    return []


def _counts(name: str, model, lr: torch.Tensor, teacher: bool, size: str) -> dict[str, Any]:
    from compress.profile.counters import MacCounter, count_params

    if teacher:  # the whole deployed pipeline (DAPE tag path included, LoRA merged), as profiling.compare counts it
        from profiling.compare import SPECS, count_model

        counts = count_model(SPECS["osediff"], size, lr.shape[-1])  # same architecture, built on meta
        total = counts.total
        return {"model": name, "params": int(total["params"]), "macs_conv_linear": int(total["macs_conv_linear"]),
                "macs_attention": int(total["macs_attention"]), "macs_total": int(total["macs_total"]),
                "components": {k: int(v) for k, v in counts.table["params"].items()}}
    report = MacCounter(device="meta", depth=1).count(model, lr)
    params = count_params(model)
    return {"model": name, "params": int(params["total"]), "macs_conv_linear": int(report.conv_linear),
            "macs_attention": int(report.attention), "macs_total": int(report.total),
            "components": {k: int(v) for k, v in params["components"].items()}}


def run_profile(bundle, config: ProfileConfig, stage_dir: Path) -> dict[str, Any]:
    from compress.profile.latency import measure_latency

    from ..student import load_student
    from ..zoo import build

    task = bundle.recipe.task
    lr_size = config.lr_size or task.lr_size
    has_teacher_weights = bundle.size == "tiny" or not bundle.missing_weights("sd21_base", "osediff")
    teacher = None
    student, _ = load_student(bundle.student_dir())
    lr = torch.zeros(1, 3, lr_size, lr_size)
    rows = [_counts("teacher", teacher, lr, True, bundle.size), _counts("student", student, lr, False, bundle.size)]
    counter = "torch.utils.flop_counter.FlopCounterMode on meta (MACs = FLOPs/2)"

    device = bundle.device
    timed = config.latency == "on" or (config.latency == "auto" and (device.type == "cuda" or bundle.size == "tiny"))
    latency: dict[str, Any] = {}
    if timed:
        # random init when the user has no weights: timing does not depend on the values
        teacher = bundle.teacher() if has_teacher_weights else build(bundle.recipe.models.teacher, bundle.size, "cpu")
        lr_real = (torch.rand(1, 3, lr_size, lr_size, generator=torch.Generator().manual_seed(0)) * 2 - 1)
        reports = {}
        for _ in range(2):  # alternate, so both see the same machine load
            for name, model in (("teacher", teacher), ("student", student)):
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

    frame = pd.DataFrame([{k: v for k, v in r.items() if k != "components"} for r in rows])
    frame["device_counts"], frame["counter"] = "meta", counter
    frame["lr_size"], frame["sr_size"] = lr_size, lr_size * task.scale
    frame["latency_device"] = str(device) if timed else None
    frame["dtype"] = config.dtype
    with atomic_path(stage_dir / "profile.csv") as tmp:
        frame.to_csv(tmp, index=False)
    return {"rows": rows, "latency": latency, "counter": counter, "lr_size": lr_size, "sr_size": lr_size * task.scale,
            "dtype": config.dtype, "latency_device": str(device) if timed else None,
            "csv": str(stage_dir / "profile.csv"),
            "ratios": {"params": rows[1]["params"] / rows[0]["params"],
                       "macs_total": rows[1]["macs_total"] / rows[0]["macs_total"],
                       "macs_conv_linear": rows[1]["macs_conv_linear"] / rows[0]["macs_conv_linear"]}}
