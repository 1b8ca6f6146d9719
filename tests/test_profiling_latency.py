"""Latency / peak-memory harness: protocol and report, not speed (too noisy on shared CPUs)."""

import shutil

from pathlib import Path

import pytest
import torch
from torch import nn

from compress.errors import AdcError
from compress.profile import measure_latency, peak_memory


class Probe(nn.Module):
    """Tiny conv net that records what each call saw."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.calls = 0
        self.seen = []

    def forward(self, x):
        self.calls += 1
        self.seen.append(
            (x.dtype, x.is_contiguous(memory_format=torch.channels_last), torch.is_inference_mode_enabled())
        )
        return self.conv(x)


def test_cpu_report_fields_and_statistics():
    model = Probe()
    r = measure_latency(model, device="cpu", args=(torch.randn(1, 3, 16, 16),), warmup=2, repeats=7)
    assert len(r.times_ms) == r.repeats == 7 and r.warmup == 2
    assert all(t > 0 for t in r.times_ms)
    assert r.min_ms <= r.q1_ms <= r.median_ms <= r.q3_ms <= r.max_ms
    assert r.iqr_ms == pytest.approx(r.q3_ms - r.q1_ms)
    assert r.min_ms <= r.mean_ms <= r.max_ms
    assert r.device == "cpu" and "torch threads" in r.device_name and r.num_threads >= 1
    assert "perf_counter" in r.timer
    assert r.torch_version == torch.__version__ and r.dtype is None
    assert not r.compiled and r.compile_time_s is None
    assert r.peak_memory_bytes > 0 and r.peak_memory_delta_bytes >= 0 and "RSS" in r.peak_memory_method
    # every call ran under inference_mode; warm-up + 1 memory call + timed calls
    assert model.calls == 2 + 1 + 7
    assert all(seen[2] for seen in model.seen)
    assert "median" in str(r) and r.to_dict()["times_ms"] == r.times_ms


def test_repeats_and_warmup_are_honoured_without_memory_call():
    model = Probe()
    r = measure_latency(model, device="cpu", args=(torch.randn(1, 3, 8, 8),), warmup=0, repeats=1, measure_memory=False)
    assert model.calls == 1 and len(r.times_ms) == 1
    assert r.median_ms == r.min_ms == r.max_ms and r.iqr_ms == 0 and r.peak_memory_bytes is None


def test_dtype_cast_autocast_and_channels_last():
    model = Probe()
    x = torch.randn(1, 3, 8, 8)
    r = measure_latency(model, device="cpu", args=(x,), warmup=0, repeats=2, dtype="bf16", channels_last=True)
    assert r.dtype == "bfloat16" and r.channels_last and not r.autocast
    assert model.conv.weight.dtype == torch.bfloat16  # module cast in place, as documented
    assert model.seen[-1][:2] == (torch.bfloat16, True)

    model = Probe()
    out_dtypes = []
    model.register_forward_hook(lambda m, i, o: out_dtypes.append(o.dtype))
    r = measure_latency(model, device="cpu", args=(x,), warmup=0, repeats=2, dtype=torch.bfloat16, autocast=True)
    assert r.autocast and model.conv.weight.dtype == torch.float32  # weights left alone
    assert model.seen[-1][0] == torch.float32 and out_dtypes[-1] == torch.bfloat16  # conv ran in bf16


def test_plain_function_with_kwargs():
    lin = nn.Linear(4, 4)
    r = measure_latency(lambda a, *, b: lin(a) + b, device="cpu", module=lin, args=(torch.randn(2, 4),),
                        kwargs={"b": torch.ones(2, 4)}, warmup=1, repeats=3, dtype="fp16")
    assert lin.weight.dtype == torch.float16 and r.dtype == "float16" and len(r.times_ms) == 3


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"repeats": 0}, "repeats=0"),
        ({"warmup": -1}, "warmup=-1"),
        ({"dtype": "int8"}, "dtype='int8'"),
        ({"autocast": True}, "autocast"),
        ({"device": "tpu"}, "device='tpu'"),
    ],
)
def test_bad_settings_raise_adc_error(bad, match):
    kw = {"device": "cpu", "args": (torch.randn(1, 3, 8, 8),), "warmup": 0, "repeats": 1, **bad}
    with pytest.raises(AdcError, match=match):
        measure_latency(Probe(), **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(AdcError, match="no CUDA GPU"):
        measure_latency(Probe(), device="cuda", args=(torch.randn(1, 3, 8, 8),))


def test_compile_time_is_reported_apart_from_timings():
    """Dynamo with the eager backend: exercises the compile path in seconds, no C++ build."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    model = Probe()
    r = measure_latency(model, device="cpu", args=(torch.randn(1, 3, 8, 8),), warmup=1, repeats=3,
                        compile=True, compile_kwargs={"backend": "eager"}, measure_memory=False)
    assert r.compiled and r.compile_time_s > 0 and r.compile_kwargs == {"backend": "eager"}
    assert len(r.times_ms) == 3


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None, reason="inductor needs a C++ compiler")
def test_compile_inductor_cpu():
    r = measure_latency(nn.Conv2d(3, 4, 3), device="cpu", args=(torch.randn(1, 3, 8, 8),), warmup=1, repeats=3,
                        compile=True, measure_memory=False)
    assert r.compiled and r.compile_time_s > 0 and len(r.times_ms) == 3


_PEAK_PROBE = """
import sys, torch
import compress.profile.latency as lat
if sys.argv[1] == "psutil":
    lat._reset_hwm = lambda: False
with lat.peak_memory("cpu") as pm:
    t = torch.ones(16 * 2**20)  # 64 MiB, above glibc's mmap threshold: fresh pages
print(pm.method, "|", pm.delta_bytes, pm.peak_bytes, pm.start_bytes)
"""


@pytest.mark.parametrize("reset_ok", [True, False], ids=["vmhwm", "psutil-sampler"])
def test_peak_memory_sees_a_64mib_tensor(reset_ok):
    # A fresh process: in a long test session the allocator may hand back pages it already holds,
    # and a process-wide peak then (rightly) shows no growth.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE, "vmhwm" if reset_ok else "psutil"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    method, numbers = out.rsplit("|", 1)
    delta, peak, start = map(int, numbers.split())
    assert ("VmHWM" in method) == reset_ok and ("psutil" in method) != reset_ok
    assert delta >= 60 * 2**20 and peak >= start


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_events_and_peak_memory():
    model = Probe()
    r = measure_latency(model, device="cuda", args=(torch.randn(1, 3, 64, 64),), warmup=2, repeats=5, dtype="fp16")
    assert "CUDA events" in r.timer and r.device.startswith("cuda:") and r.cuda_version
    assert r.device_name == torch.cuda.get_device_name(torch.device(r.device))
    assert r.peak_memory_bytes > 0 and "max_memory_allocated" in r.peak_memory_method
    assert len(r.times_ms) == 5 and r.min_ms <= r.median_ms <= r.max_ms
    with peak_memory("cuda") as pm:
        t = torch.empty(32 * 2**20, device="cuda")  # 128 MiB
    assert pm.delta_bytes >= 128 * 2**20
    del t
