"""profiling/gpu_bench: the order of a budgeted GPU run, skipped rows, the ONNX row, and the wheel install path.

All on the CPU: the GPU itself is exercised only by ``profiling/gpu_bench.sh`` on a GPU machine.
"""

import csv
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from profiling import gpu_bench

REPO = Path(__file__).resolve().parents[1]


def test_plan_measures_every_eager_row_first_then_bf16_compiled_adcsr():
    o = gpu_bench.GpuBenchOptions(modes=("eager", "compile", "compile-cudagraphs", "onnx"))
    plan = gpu_bench.plan_rows(o)
    eager = [p for p in plan if p[2] == "eager"]
    assert plan[:len(eager)] == eager and len(eager) == 6  # 2 models x 3 dtypes, cheap and needed for the ratio
    rest = plan[len(eager):]
    assert rest[:4] == [("adcsr", "bf16", "compile"), ("osediff", "bf16", "compile"),
                        ("adcsr", "bf16", "compile-cudagraphs"), ("osediff", "bf16", "compile-cudagraphs")]
    assert rest[4] == ("adcsr", "fp32", "onnx")  # the exported graph: AdcSR only, fp32
    assert rest[-1] == ("osediff", "fp32", "compile-cudagraphs")
    assert len(plan) == len(set(plan)) == 6 + 12 + 1


def test_a_spent_budget_skips_rows_but_still_writes_the_report(tmp_path, capsys):
    out = tmp_path / "gpu"
    argv = ["--size", "tiny", "--device", "cpu", "--lr-size", "32", "--dtypes", "fp32", "--modes", "eager,compile",
            "--budget-s", "0", "--out", str(out)]
    assert gpu_bench.main(argv) == 0
    md = (out / "gpu-latency.md").read_text()
    assert "DRY RUN on cpu" in md and "AdcSR bf16 compiled: not measured" in md
    with open(out / "gpu-latency.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["quantity"] for r in rows} == {"skipped"} and len(rows) == 4
    assert {(r["model"], r["mode"]) for r in rows} == {("osediff", "eager"), ("adcsr", "eager"),
                                                      ("osediff", "compile"), ("adcsr", "compile")}
    assert all("--budget-s 0" in r["timer"] for r in rows)


def test_bad_mode_is_one_line(capsys):
    assert gpu_bench.main(["--device", "cpu", "--modes", "eager,tensorrt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --modes eager,tensorrt") and "\n" not in err


@pytest.mark.slow
def test_onnx_row_dry_runs_on_the_cpu_provider(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "gpu"
    argv = ["--size", "tiny", "--device", "cpu", "--lr-size", "32", "--dtypes", "fp32", "--modes", "eager,onnx",
            "--models", "adcsr", "--warmup", "0", "--repeats", "2", "--threads", "1", "--out", str(out)]
    assert gpu_bench.main(argv) == 0
    with open(out / "gpu-latency.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    med = {r["mode"]: float(r["value"]) for r in rows if r["quantity"] == "latency_median"}
    assert set(med) == {"eager", "onnx"} and all(v > 0 for v in med.values())
    md = (out / "gpu-latency.md").read_text()
    assert "ONNX (onnxruntime)" in md and "CPUExecutionProvider" in md and "max abs vs CPU eager fp32" in md


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_bench_sh_installs_the_carried_wheels_offline_and_dry_runs(tmp_path):
    """What a bare GPU image does: diffusers and torch-pruning come from .whl/ into a --target folder."""
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if not any(w.name.startswith("diffusers-") for w in wheels):
        pytest.skip("no .whl/diffusers-*.whl (see the README's Deploy section for the download line)")
    env = {**os.environ, "ADC_GPU_BENCH_DRY_RUN": "1", "ADC_FORCE_WHEELS": "1", "ADC_SITE": str(tmp_path / "site"),
           "ADC_DRY_OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", str(REPO / "profiling" / "gpu_bench.sh"), "--models", "adcsr"], capture_output=True,
                       text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"diffusers 0.42.1 ({tmp_path / 'site'})" in r.stderr or f"({tmp_path / 'site'})" in r.stderr
    assert (tmp_path / "site" / "diffusers").is_dir() and (tmp_path / "site" / "torch_pruning").is_dir()
    assert "DRY RUN on cpu" in (tmp_path / "out" / "gpu-latency.md").read_text()
