"""int8 post-training quantization measured: fp32 vs int8 onnxruntime on this CPU (``reports/quantization.md``).

    python profiling/bench_quantize.py                                   # tiny and full-size, random weights
    python profiling/bench_quantize.py --student RUN/04-distill/student  # + a trained student of a demo run
    python profiling/bench_quantize.py --skip-full                       # tiny only (full size: ~10 min, ~15 GB)

Each case is what the ``quantize`` stage does (:mod:`compress.stages.quantize`): fp32 ONNX export,
onnxruntime QDQ int8 calibrated on crops of the demo's training HR (``data/samples/train``; the
eval pairs are never used), per-layer sensitivity and mixed precision where affordable, then
fp32 and int8 timed in one process (calls alternating, 1 onnxruntime thread) and compared on
held-out training crops. Each case runs in its own process, so one that runs out of memory is
reported, not fatal. The issue's goals: int8 >= 2.0x fp32's speed, file <= 0.3x, >= 35 dB vs fp32.
Random weights say nothing about quality (no training shaped their activations); the trained
student's rows do.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "samples" / "train"
GOALS = {"speedup": 2.0, "size": 0.3, "psnr": 35.0}

# name -> (model, LR side, QuantizeConfig overrides, compare activation types)
CASES = {
    "tiny-random-128": ("tiny", 128, {"group_depth": 3}, True),
    "trained-32": ("student", 32, {"group_depth": 3}, True),
    "trained-128": ("student", 128, {"group_depth": 3}, False),
    # full size: one calibration costs ~45 s and ~14 GB (onnxruntime calibrates unoptimised), one quantization
    # ~40 s: per-layer sensitivity (a quantization per group) would take most of an hour here
    "full-random-128": ("full", 128, {"sensitivity": False, "sensitivity_images": 1, "calibration_images": 2, "check_images": 1,
                                      "warmup": 1, "repeats": 2}, False),
}
# every node int8, no sensitivity: activation type and onnxruntime's pre-processing, timed against fp32
VARIANTS = {"uint8": {"activation_type": "uint8"}, "int8": {"activation_type": "int8"},
            "uint8, pre-processed": {"activation_type": "uint8", "preprocess": True},
            "uint8, attention int8": {"activation_type": "uint8", "attention_int8": True}}
HEADERS = {"uint8": "uint8 activations (default)", "int8": "int8 activations",
           "uint8, pre-processed": "uint8, after quant_pre_process",
           "uint8, attention int8": "uint8, attention MatMuls int8 too"}
LABELS = {"tiny": "tiny AdcSR student, random weights (seed 0)", "full": "full-size AdcSR student, random weights (seed 0)",
          "student": "trained tiny student (a recipes/adcsr-tiny.yaml run through distill)"}


def _versions() -> str:
    import onnx
    import onnxruntime
    import torch

    from compress import __version__

    return (f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"adc {__version__}, Python {platform.python_version()}")


def _int8_flags() -> str:
    """The CPU's int8 dot-product instructions (what onnxruntime's int8 kernels can use)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "CPU flags unknown"
    have = [f for f in ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return "int8-relevant CPU flags: " + (", ".join(have) or "none")


def _time_variants(paths: dict[str, Path], x, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of each file in this process (1 thread), calls round-robin one by one (as the gate times)."""
    import statistics

    import torch

    from compress.deploy.record import read_export_record
    from compress.deploy.runtime import OnnxSR

    models = {k: OnnxSR(p, read_export_record(p), "cpu", 1) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    lr = torch.from_numpy(x)
    for m in models.values():
        for _ in range(warmup):
            m.run(lr)
    for _ in range(repeats):
        for k, m in models.items():
            t = time.perf_counter()
            m.run(lr)
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _op_times(path: Path, x, prefix: Path, calls: int = 2) -> dict[str, float]:
    """ms per call by operator type, from onnxruntime's profiler (1 thread, after one warm-up call)."""
    from collections import Counter

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    opts_prof = ort.SessionOptions()
    opts_prof.intra_op_num_threads, opts_prof.inter_op_num_threads = 1, 1
    opts_prof.enable_profiling, opts_prof.profile_file_prefix = True, str(prefix)
    sess = ort.InferenceSession(str(path), opts_prof, providers=["CPUExecutionProvider"])
    sess.run(None, {name: x})  # warm-up, dropped below
    for _ in range(calls):
        sess.run(None, {name: x})
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first = runs[1]["ts"] if len(runs) > 1 else 0
    total: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= first:
            total[e["args"]["op_name"]] += e["dur"] / 1e3 / calls
    return dict(total)


def run_case(name: str, student: str | None, out: Path) -> None:
    import torch

    from compress.config import from_dict
    from compress.deploy.export import export_model
    from compress.quantize import QuantizeConfig, calibration_set, quantize_onnx, ship

    torch.set_num_threads(1)
    kind, lr, overrides, compare = CASES[name]
    config = from_dict(QuantizeConfig, {**overrides, "threads": 1}, f"case {name}")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    if kind == "student":
        from compress.student import load_student_state

        model = load_student_state(student).model.eval()
    else:
        from compress.zoo.adcsr import build_adcsr

        model = build_adcsr(kind).eval()
    params = sum(p.numel() for p in model.parameters())
    cal = calibration_set([TRAIN], lr, 4, config.calibration_images, config.check_images, config.seed)
    steps: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "fp32.onnx"
        t = time.perf_counter()
        export_model(model, fp32, "onnx", lr, color_fix="inside", source=LABELS[kind], check=kind != "full")
        del model
        steps["export_s"] = time.perf_counter() - t
        t = time.perf_counter()
        q = quantize_onnx(fp32, tmp / "int8.onnx", config, cal.calibration, threads=1, calibration_how=cal.how,
                          log=lambda s: print(f"[{name}] {s}", file=sys.stderr, flush=True))
        steps["quantize_s"] = time.perf_counter() - t
        t = time.perf_counter()
        res = ship(fp32, q, config, cal.held_out, tmp / "s.int8.onnx", tmp / "s.fp32.onnx", threads=1,
                   log=lambda s: print(f"[{name}] {s}", file=sys.stderr, flush=True))
        steps["measure_s"] = time.perf_counter() - t
        t = time.perf_counter()  # where the time goes: fp32 and the int8 file that was scored
        ops = {"fp32": _op_times(fp32, cal.held_out[0], tmp / "prof"),
               "int8": _op_times(q.path, cal.held_out[0], tmp / "prof")}
        steps["op_profile_s"] = time.perf_counter() - t
        activations = None
        if compare:  # which activation type is faster here, and whether pre-processing helps: every node int8
            t = time.perf_counter()
            paths = {"fp32": fp32}
            for variant, extra in VARIANTS.items():
                c = from_dict(QuantizeConfig, {**overrides, "threads": 1, "sensitivity": False, **extra}, variant)
                paths[variant] = quantize_onnx(fp32, tmp / f"{variant}.onnx", c, cal.calibration, threads=1).path
            activations = _time_variants(paths, cal.held_out[0], 2, 20)
            steps["variants_s"] = time.perf_counter() - t
    steps["total_s"] = time.perf_counter() - t0
    result = {"name": name, "label": LABELS[kind], "lr": lr, "params": params, "config": overrides,
              "quantization": res.record["quantization"], "sensitivity": q.sensitivity[:12],
              "groups": len(q.sensitivity), "activations": activations, "ops": ops, "steps": steps, "versions": _versions(),
              "flags": _int8_flags()}
    out.write_text(json.dumps(result, default=str))


def _cell(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def report(results: list[dict], failed: dict[str, str], wall: float, command: str) -> str:
    from compress.quantize.report import sensitivity_markdown

    first = next((r for r in results), None)
    dev = first["quantization"]["check"]["device"] if first else "?"
    lines = [f"`{command}`", "", "# int8 post-training quantization (onnxruntime, CPU): measured", "",
             f"Device: {dev} ({first['flags'] if first else ''}). {first['versions'] if first else ''}. "
             f"Wall time {wall / 60:.1f} min.", "",
             "Every case is what the `quantize` stage does with its defaults: fp32 ONNX export (TorchScript exporter, "
             "opset 18, static graph, colour fix inside), then `onnxruntime.quantization.quantize_static` (no "
             "`quant_pre_process`): QDQ, int8 weights per "
             "channel, uint8 activations per tensor, MinMax calibration on LR crops of the demo's 24 training HR "
             "images (`data/samples/train`, 256x256: at LR 128 a 512 px crop is the image reflect-padded), Conv, "
             "Gemm and weight MatMuls int8, attention's activation x activation MatMuls fp32. fp32 and int8 are "
             "timed through `OnnxSR` (what `compress.sr` runs) in one process, calls alternating one by one, 1 onnxruntime "
             "thread, batch 1; quality is int8 vs fp32 on training crops held out of the calibration ([0, 1] "
             "images, PSNR over all pixels). Goals (issue 20): >= 2.0x fp32's speed, file <= 0.3x, >= 35 dB.", "",
             "| case | LR -> SR | params | fp32 ms | int8 ms | speed | fp32 MiB | int8 MiB | size | PSNR vs fp32 (held out) "
             "| nodes int8 / quantizable | gate (min 1.2x, 35 dB) | s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        q, c = r["quantization"], r["quantization"]["check"]
        size = c["bytes"]["int8"] / c["bytes"]["fp32"]
        lines.append(f"| {r['label']} | {r['lr']} -> {4 * r['lr']} | {r['params'] / 1e6:.2f} M | "
                     f"{c['latency_ms']['fp32']:.1f} | {c['latency_ms']['int8']:.1f} | **{c['speedup']:.2f}x** | "
                     f"{c['bytes']['fp32'] / 2**20:.1f} | {c['bytes']['int8'] / 2**20:.1f} | {size:.2f}x | "
                     f"{_cell(c['psnr_db'])} dB ({c['images']}) | {q['quantized_nodes']} / {q['quantizable_nodes']} | "
                     f"{q['shipped']} shipped | {r['steps']['total_s']:.0f} |")
    for name, why in failed.items():
        lines.append(f"| {name} | not measured: {why} |||||||||||")
    lines += ["", "Reading the table:", ""]
    for r in results:
        q = r["quantization"]
        c = q["check"]
        cal = q["calibration_score"]
        s = q.get("sensitivity")
        steps = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in r["steps"].items())
        lines.append(f"- **{r['label']}, LR {r['lr']}**: {q['verdict']}. All {q['quantizable_nodes'] - len(q['kept_fp32']['config'])} "
                     f"nodes int8: {_cell(cal['all_int8_psnr_db'])} dB vs fp32 on {cal['images']} calibration crops"
                     + (f"; sensitivity over {s['groups']} groups (module depth {s['group_depth']}) kept "
                        f"{len(q['kept_fp32']['sensitivity'])} nodes fp32 for {_cell(cal['psnr_db'])} dB"
                        if s else "; no sensitivity (too slow at this size, see CASES)")
                     + f". Steps: {steps}.")
    lines += ["", "## Where the time goes", "",
              "onnxruntime's profiler, 1 thread, ms per call by operator type (kernel time; the mean of 2 calls after "
              "a warm-up), fp32 and the int8 file of the table. Attention's QK^T (`FusedMatMul`), softmax and attn x V "
              "(activation `MatMul`) stay fp32 in both: at LR 128 the tiny student's 4096-token attention is most "
              "of its time, so int8 convolutions cannot make it 2x faster; the full-size student's wide "
              "convolutions dominate and int8 `QLinearConv` takes most of their time off. Kernel sums include the "
              "profiler's per-node overhead (int8 graphs have more nodes): the latency column above is the measure.", ""]
    for r in results:
        ops = r.get("ops")
        if not ops:
            continue
        f, i = ops["fp32"], ops["int8"]
        top = sorted(set(sorted(f, key=f.get)[-7:]) | set(sorted(i, key=i.get)[-7:]), key=lambda k: -(f.get(k, 0) + i.get(k, 0)))
        lines += [f"**{r['label']}, LR {r['lr']}** (total {sum(f.values()):.1f} ms fp32, {sum(i.values()):.1f} ms int8):", "",
                  "| operator | fp32 ms | int8 ms |", "|---|---:|---:|"]
        lines += [f"| {k} | {f.get(k, 0):.1f} | {i.get(k, 0):.1f} |" for k in top] + [""]
    acts = [r for r in results if r["activations"]]
    if acts:
        names = list(VARIANTS)
        lines += ["", "## Activation type, pre-processing, attention", "",
                  "Every node int8 (no sensitivity), the same calibration crops, every file timed with fp32 "
                  "(20 calls each, round-robin one by one, 1 thread), median ms:", "",
                  "| case | fp32 | " + " | ".join(HEADERS[n] for n in names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        for r in acts:
            a = r["activations"]
            lines.append(f"| {r['label']}, LR {r['lr']} | {a['fp32']:.1f} | " + " | ".join(f"{a[n]:.1f}" for n in names) + " |")
        lines += ["", "The stage's defaults follow these rows: `activation_type: uint8` (int8 activations were slower in "
                  "every row: onnxruntime's x86 kernels are U8S8) and `preprocess: false`: onnxruntime's "
                  "`quant_pre_process` moved latency by a few per cent, faster in this run, 2-3 % slower in an earlier run "
                  "of this script (same files and machine): within this shared machine's noise, and it costs about a "
                  "minute at full size. Attention's activation x activation MatMuls stay fp32 "
                  "(`attention_int8: false`): int8, they cost more in Q/DQ than they save."]
    for r in results:
        if r["sensitivity"]:
            lines += ["", f"## Sensitivity: {r['label']}, LR {r['lr']}", "",
                      "Each group quantized alone, the rest fp32, PSNR vs fp32 on 2 calibration crops; most "
                      f"sensitive first (top {len(r['sensitivity'])} of {r['groups']}):", ""]
            lines += sensitivity_markdown(r["sensitivity"], top=len(r["sensitivity"]))
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default=None, help="a trained tiny student folder (a run's NN-distill/student)")
    p.add_argument("--skip-full", action="store_true", help="tiny cases only")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "quantization.md")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        run_case(args.case, args.student, args.json)
        return 0
    names = [n for n in CASES if (args.student or CASES[n][0] != "student") and not (args.skip_full and CASES[n][0] == "full")]
    results, failed = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            js = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--json", str(js)]
            if args.student:
                cmd += ["--student", args.student]
            print(f"case {name} ...", file=sys.stderr, flush=True)
            r = subprocess.run(cmd, cwd=REPO)
            if r.returncode == 0 and js.is_file():
                results.append(json.loads(js.read_text()))
            else:
                failed[name] = ("killed (signal 9: out of memory?)" if r.returncode == -9 else f"exit code {r.returncode}")
    command = "python profiling/bench_quantize.py" + (" --student RUN/04-distill/student" if args.student else "") + \
        (" --skip-full" if args.skip_full else "")
    sys.path.insert(0, str(REPO))
    from compress.io import atomic_write_text

    atomic_write_text(args.out, report(results, failed, time.perf_counter() - t0, command))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
