"""CPU latency of the AdcSR student per runtime, against the official code, from one run -> reports/deploy.md.

    python profiling/bench_deploy.py --size full --lr-size 128 --threads 2 --rounds 5 \\
        [--official-repo /path/to/AdcSR] [--variants onnxruntime,compile,channels_last] [--out reports]

Why this way:

* One full-size random-init student (latency does not depend on weight values; no checkpoint
  needed), fp32, batch 1, the same thread count for every runtime (torch and onnxruntime).
* The reference is the official code: ``--official-repo`` points at a local clone of
  Guaishou74851/AdcSR, whose ``model.py`` (``Net``) is imported at run time (never vendored) and
  given our weights, then run as its ``test.py`` does; without it, the independent functional
  statement of the official forward in ``tests/official_adcsr_reference.py`` stands in.
* Interleaved rounds: every round calls each runtime once, in a rotated order, after one untimed
  warm-up call each; ratios are of medians over the same rounds, so load from other jobs on a
  shared machine hits every runtime alike. Each call is timed by
  :func:`compress.profile.latency.measure_latency` (``perf_counter``).
* One phase per runtime (onnxruntime, ``torch.compile`` with inductor freezing, channels_last), each
  interleaved with the official code and eager torch, then freed: at most two full-size weight
  copies in memory at once (the model, and the runtime's own copy).
* Outputs: every runtime's max abs difference to eager torch (and the official code's) on the
  timed input; the ONNX and ``.pt2`` exports' own parity records at full size.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: import this checkout's compress, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.cli import run_cli
from compress.errors import AdcError
from compress.io import atomic_write_text
from compress.profile.latency import device_name, measure_latency

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "official_adcsr_reference.py"
VARIANTS = ("onnxruntime", "compile", "channels_last")


# ----------------------------------------------------------------------------- the official code


def _import_file(name: str, path: Path, extra_path: Path | None = None):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise AdcError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    if extra_path is not None:
        sys.path.insert(0, str(extra_path))
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise AdcError(f"{path}: import failed ({exc})") from None
    finally:
        if extra_path is not None:
            sys.path.remove(str(extra_path))
    return module


def official_from_repo(repo: Path, model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The official ``Net`` from a local clone, built on ``meta`` and given ``model``'s weights (shared, not copied),
    run as the official ``test.py`` runs it: Net -> decoder up path -> colour match."""
    from compress.zoo.adcsr import build_half_decoder, official_state_dicts
    from compress.zoo.sd import build_unet

    if not (repo / "model.py").is_file() or not (repo / "forward.py").is_file():
        raise AdcError(f"--official-repo {repo}: expected a clone of Guaishou74851/AdcSR with model.py and forward.py")
    mod = _import_file("adcsr_official_model", repo / "model.py", repo)
    unet = build_unet("full", "meta")
    with torch.device("meta"):  # the official constructor slices SD's weights: on meta that costs nothing
        decoder = build_half_decoder(model.config)
        net = mod.Net(unet, copy.deepcopy(decoder))
    net_sd, dec_sd = official_state_dicts(model)
    net.load_state_dict({k.removeprefix("module."): v for k, v in net_sd.items()}, strict=True, assign=True)
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in dec_sd["state_dict"].items()}, strict=True,
                            assign=True)
    body = nn.Sequential(net, *decoder.up_blocks, decoder.conv_norm_out, decoder.conv_act, decoder.conv_out).eval()

    def forward(lr: torch.Tensor) -> torch.Tensor:
        sr = body(lr)
        return (sr - sr.mean(dim=[2, 3], keepdim=True)) / sr.std(dim=[2, 3], keepdim=True) \
            * lr.std(dim=[2, 3], keepdim=True) + lr.mean(dim=[2, 3], keepdim=True)

    return forward, f"official model.py of Guaishou74851/AdcSR{_commit(repo)} (Net + decoder tail + colour match, as test.py)"


def _commit(repo: Path) -> str:
    """`` at commit abc1234`` of a git clone, or nothing."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" at commit {head}" if head else ""


def official_reference(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The functional statement of the official forward (tests/official_adcsr_reference.py), on ``model``'s weights."""
    from compress.zoo.adcsr import official_state_dicts

    ref = _import_file("official_adcsr_reference", REFERENCE)
    net_sd, dec_sd = official_state_dicts(model)
    return (lambda lr: ref.official_forward(lr, net_sd, dec_sd, model.config),
            "tests/official_adcsr_reference.py (functional statement of the official forward; no --official-repo given)")


# ----------------------------------------------------------------------------- measurement


@dataclass
class Phase:
    """One runtime timed in rounds interleaved with the official code and eager torch."""

    name: str
    times_ms: dict[str, list[float]] = field(default_factory=dict)
    max_abs_vs_eager: float | None = None
    max_abs_vs_official: float | None = None
    setup_s: float | None = None
    note: str = ""
    load: tuple[float, float] | None = None  # 1-min load average at the start and end of the rounds

    def median(self, who: str) -> float:
        return statistics.median(self.times_ms[who])


def _time_once(fn: Callable[[], Any]) -> float:
    rep = measure_latency(fn, device="cpu", warmup=0, repeats=1, measure_memory=False)
    return rep.times_ms[0]


def _interleave(calls: dict[str, Callable[[], Any]], rounds: int, log) -> dict[str, list[float]]:
    """One untimed call each, then ``rounds`` rounds calling each once in a rotated order."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            calls[n]()
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                times[n].append(_time_once(calls[n]))
            log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1] / 1e3:.2f} s" for n in names))
    return times


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


@dataclass
class BenchResult:
    options: argparse.Namespace
    phases: list[Phase]
    official_label: str
    official_vs_eager: float
    exports: list[dict[str, Any]]
    command: str
    started: str
    seconds: float
    device: str


def _setup(name: str, model: nn.Module, lr: torch.Tensor, o: argparse.Namespace, tmp: Path, exports: list,
           log) -> tuple[Callable[[], torch.Tensor], str, Callable[[], None]]:
    """(the runtime's call, a note, its teardown) for one variant."""
    if name == "onnxruntime":
        from compress.deploy.export import export_model
        from compress.deploy.runtime import load_exported

        log(f"ONNX export ({o.onnx_exporter} exporter, static {o.lr_size}x{o.lr_size}, colour fix inside) ...")
        res = export_model(model, tmp / "adcsr.onnx", "onnx", o.lr_size, False, "inside", exporter=o.onnx_exporter,
                           source=f"zoo:adcsr ({o.size}, seed 0)", check=True, log=log)
        exports.append(res.record)
        ort_model = load_exported(res.path, "cpu", o.threads)
        note = (f"onnxruntime {_ort_version()}, CPUExecutionProvider, ORT_ENABLE_ALL, {o.threads} intra-op threads; "
                f"graph from the {o.onnx_exporter} exporter; setup = export + parity check + session")
        return (lambda: ort_model(lr)), note, (lambda: res.path.unlink())
    if name == "compile":
        import torch._inductor.config as inductor_config

        log(f"torch.compile (inductor, freezing {'on' if o.freezing else 'off'}) ...")
        with _inductor_freezing(inductor_config, o.freezing):
            compiled = torch.compile(model)
            with torch.inference_mode():
                compiled(lr)
        note = (f"inductor, freezing {'on (weights constant-folded and prepacked)' if o.freezing else 'off'}; "
                "setup = compile + first call")
        return (lambda: compiled(lr)), note, torch._dynamo.reset
    if name == "channels_last":
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        lr_cl = lr.contiguous(memory_format=torch.channels_last)
        return (lambda: cl(lr_cl)), "a copy of the model, and the input, in channels_last", (lambda: None)
    raise AdcError(f"unknown variant {name!r}")


def run_bench(o: argparse.Namespace, command: str, log=lambda s: None) -> BenchResult:
    from compress.zoo.adcsr import build_adcsr

    t_start = time.perf_counter()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    torch.set_num_threads(o.threads)
    torch.manual_seed(0)
    model = build_adcsr(o.size).eval()
    lr = torch.rand(1, 3, o.lr_size, o.lr_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    official, label = (official_from_repo(Path(o.official_repo), model) if o.official_repo
                       else official_reference(model))
    with torch.inference_mode():
        ref_eager = model(lr)
        ref_official = official(lr)
    exports: list[dict[str, Any]] = []
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="adc-bench-deploy-", dir=o.tmp) as tmp:
        if "torch-export" in o.exports:
            log("torch.export (.pt2), for its full-size parity record ...")
            res = export_model_pt2(model, Path(tmp) / "adcsr.pt2", o, log)
            exports.append(res.record)
            res.path.unlink()
            gc.collect()
        for name in (v for v in o.variants if v != "eager"):
            t0 = time.perf_counter()
            call, note, teardown = _setup(name, model, lr, o, Path(tmp), exports, log)
            with torch.inference_mode():
                out = call()
            ph = Phase(name, setup_s=time.perf_counter() - t0, note=note, max_abs_vs_eager=_max_abs(out, ref_eager),
                       max_abs_vs_official=_max_abs(out, ref_official))
            del out
            log(f"{name}: {', '.join(['official', 'eager', name])} x {o.rounds} rounds "
                f"(max abs vs eager {ph.max_abs_vs_eager:.1e})")
            start_load = _load()
            ph.times_ms = _interleave({"official": lambda: official(lr), "eager": lambda: model(lr), name: call},
                                      o.rounds, log)
            ph.load = (start_load, _load())
            phases.append(ph)
            del call
            teardown()
            gc.collect()
    return BenchResult(o, phases, label, _max_abs(ref_official, ref_eager), exports, command, started,
                       time.perf_counter() - t_start, device_name("cpu"))


def export_model_pt2(model: nn.Module, path: Path, o: argparse.Namespace, log):
    from compress.deploy.export import export_model

    return export_model(model, path, "torch-export", o.lr_size, False, "inside", source=f"zoo:adcsr ({o.size}, seed 0)",
                        check=True, log=log)


@contextlib.contextmanager
def _inductor_freezing(config, on: bool):
    old = config.freezing
    config.freezing = on
    try:
        yield
    finally:
        config.freezing = old


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "absent"


# ----------------------------------------------------------------------------- report


def _s(ms: float) -> str:
    return f"{ms / 1e3:.2f}"


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def render_markdown(res: BenchResult) -> str:
    o = res.options
    where = f"{res.device} [cpu], {o.threads} threads (torch and onnxruntime), fp32, LR {o.lr_size}x{o.lr_size} " \
            f"-> SR {4 * o.lr_size}x{4 * o.lr_size}, batch 1, `{o.size}` AdcSR (random init, seed 0)"
    lines = [f"Generated by: `{res.command}` (started {res.started}, took {res.seconds / 60:.0f} min)\n",
             "# Deploying the AdcSR student on the CPU: runtimes against the official code\n",
             f"Where: {where}; torch {torch.__version__}, onnxruntime {_ort_version()}, Python "
             f"{platform.python_version()}. Official code: {res.official_label}; its output differs from adc's eager "
             f"AdcSR by {res.official_vs_eager:.1e} max abs on the timed LR.\n",
             f"Protocol: one phase per runtime. In a phase the official code, adc's eager AdcSR and the runtime are "
             f"called once each untimed, then in {o.rounds} interleaved rounds (each once per round, rotated order); "
             "every call is timed by `compress.profile.latency.measure_latency` (perf_counter). A runtime's ratios are "
             "of medians from its own phase's rounds, so the load from other jobs on this shared machine hits the "
             "three alike (the 1-minute load average at the start and end of the rounds is listed). At most two "
             "full-size weight copies are in memory at once.\n"]
    table = ["| runtime | median (s) | min-max (s) | official code, same rounds (s) | eager, same rounds (s) | "
             "speed vs official | speed vs eager | max abs vs eager | max abs vs official | setup (s) | load avg | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    best = None
    for ph in res.phases:
        t = ph.times_ms[ph.name]
        off, eag, me = ph.median("official"), ph.median("eager"), ph.median(ph.name)
        if ph.max_abs_vs_eager is not None and ph.max_abs_vs_eager <= 1e-3 and (best is None or off / me > best[1]):
            best = (ph.name, off / me)
        load = f"{ph.load[0]:.1f} -> {ph.load[1]:.1f}" if ph.load else "-"
        table.append(f"| {ph.name} | {_s(me)} | {_s(min(t))}-{_s(max(t))} | {_s(off)} | {_s(eag)} | {off / me:.2f}x | "
                     f"{eag / me:.2f}x | {_e(ph.max_abs_vs_eager)} | {_e(ph.max_abs_vs_official)} | "
                     f"{'-' if ph.setup_s is None else f'{ph.setup_s:.0f}'} | {load} | {ph.note} |")
    eager_rows = [ph.median("official") / ph.median("eager") for ph in res.phases]
    lines.append(f"## Latency per runtime — {where}\n")
    lines += table
    lines.append("\nLegend. speed vs official = official median / this median, both from the same rounds (> 1: faster "
                 "than the official code). max abs: on the timed LR, SR in [-1, 1], colour fix included.")
    if eager_rows:
        lines.append(f"adc's eager AdcSR against the official code, per phase: "
                     f"{', '.join(f'{x:.2f}x' for x in eager_rows)} (parity, as the issue measured).\n")
    if best:
        goal = "reached" if best[1] >= 1.5 else "not reached"
        lines.append(f"**Fastest adc CPU path within 1e-3 of eager: {best[0]}, {best[1]:.2f}x the official code's "
                     f"speed (goal >= 1.5x: {goal}).**\n")
    if res.exports:
        lines.append(f"## Export parity at `{o.size}` size — {where}\n")
        lines.append("| format | exporter | opset | LR size | colour fix | max abs vs eager fp32 | runtime | export (s) |\n"
                     "|---|---|---|---|---|---|---|---|")
        for rec in res.exports:
            par = rec.get("parity") or {}
            lines.append(f"| {rec['export_format']} | {rec['exporter']} | {rec.get('opset') or '-'} | "
                         f"{'dynamic' if rec['dynamic'] else 'x'.join(map(str, rec['lr_size']))} | {rec['color_fix']} | "
                         f"{_e(par.get('max_abs'))} (tolerance {par.get('tolerance', '-')}) | {par.get('runtime', '-')} | "
                         f"{rec.get('export_seconds', '-')} |")
        lines.append("\nLegend. Parity as recorded in each file's own record (`python -m compress.export --show FILE`): "
                     "seeded random LR in [-1, 1] at the export size, against eager PyTorch fp32.\n")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python profiling/bench_deploy.py", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--lr-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--exports", default="torch-export",
                   help="extra exports made only for their full-size parity record (torch-export, or none)")
    p.add_argument("--onnx-exporter", default="dynamo", choices=("dynamo", "torchscript"))
    p.add_argument("--no-freezing", dest="freezing", action="store_false",
                   help="torch.compile without inductor freezing")
    p.add_argument("--official-repo", default=None, help="local clone of Guaishou74851/AdcSR (imports its model.py)")
    p.add_argument("--out", default="reports", help="folder for deploy.md")
    p.add_argument("--tmp", default=None, help="folder for the temporary exports (default: the system's)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    o = _parser().parse_args(argv)
    o.variants = tuple(v.strip() for v in o.variants.split(",") if v.strip())
    o.exports = tuple(v.strip() for v in o.exports.split(",") if v.strip() and v.strip() != "none")
    # no machine paths in a report: the clone is named by what it is, with its commit in the label
    shown = [("ADCSR_CLONE" if i and argv[i - 1] == "--official-repo" else a) for i, a in enumerate(argv)]
    command = "python profiling/bench_deploy.py" + (" " + shlex.join(shown) if argv else "")

    def body() -> int:
        bad = [v for v in o.variants if v not in VARIANTS]
        if bad:
            raise AdcError(f"--variants {','.join(bad)}: expected a subset of {','.join(VARIANTS)}")
        if o.official_repo and o.size != "full":
            raise AdcError("--official-repo: the official Net is full-size only; drop it or use --size full")
        if o.lr_size < 16 or o.lr_size % 16 or o.threads < 1 or o.rounds < 1:
            raise AdcError("--lr-size must be a multiple of 16; --threads and --rounds >= 1")
        res = run_bench(o, command, log=lambda s: print(s, file=sys.stderr, flush=True))
        path = atomic_write_text(Path(o.out) / "deploy.md", render_markdown(res))
        print(f"wrote {path} in {res.seconds / 60:.0f} min")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
