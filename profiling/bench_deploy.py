"""CPU latency of the AdcSR student per runtime, against the official code, from one run -> reports/deploy.md.

    python profiling/bench_deploy.py --size full --lr-size 128 --threads 2 --rounds 5 \\
        [--official-repo /path/to/AdcSR] [--variants eager,compile,channels_last,onnxruntime] [--out reports]

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
* At most two full-size weight copies at once: phase 1 runs the official code, eager torch,
  ``torch.compile`` (same weights) and onnxruntime (its own copy); phase 2 frees onnxruntime and
  runs a channels_last copy, again beside the official code and eager torch.
* Outputs: every runtime's max abs difference to eager torch (and the official code's) on the
  timed input; the ONNX and ``.pt2`` exports' own parity records at full size.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
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

from compress.errors import AdcError
from compress.io import atomic_write_text
from compress.profile.latency import device_name, measure_latency

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "official_adcsr_reference.py"
VARIANTS = ("eager", "compile", "channels_last", "onnxruntime")


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

    return forward, f"official model.py from {repo} (Net + decoder tail + colour match, as test.py)"


def official_reference(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The functional statement of the official forward (tests/official_adcsr_reference.py), on ``model``'s weights."""
    from compress.zoo.adcsr import official_state_dicts

    ref = _import_file("official_adcsr_reference", REFERENCE)
    net_sd, dec_sd = official_state_dicts(model)
    return (lambda lr: ref.official_forward(lr, net_sd, dec_sd, model.config),
            "tests/official_adcsr_reference.py (functional statement of the official forward; no --official-repo given)")


# ----------------------------------------------------------------------------- measurement


@dataclass
class Row:
    name: str
    phase: int
    times_ms: list[float] = field(default_factory=list)
    max_abs_vs_eager: float | None = None
    max_abs_vs_official: float | None = None
    setup_s: float | None = None
    note: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


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


@dataclass
class BenchResult:
    options: argparse.Namespace
    rows: list[Row]
    official_label: str
    exports: list[dict[str, Any]]
    command: str
    started: str
    seconds: float
    device: str


def run_bench(o: argparse.Namespace, command: str, log=lambda s: None) -> BenchResult:
    from compress.deploy.export import export_model
    from compress.deploy.runtime import load_exported
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
    rows: dict[str, Row] = {"official": Row("official", 1), "eager": Row("eager", 1)}
    rows["official"].max_abs_vs_eager = _max_abs(ref_official, ref_eager)
    exports: list[dict[str, Any]] = []

    def add(name: str, phase: int, fn: Callable[[], torch.Tensor], setup_s: float | None, note: str = "") -> None:
        with torch.inference_mode():
            out = fn()
        rows[name] = Row(name, phase, setup_s=setup_s, note=note, max_abs_vs_eager=_max_abs(out, ref_eager),
                         max_abs_vs_official=_max_abs(out, ref_official))

    calls: dict[str, Callable[[], Any]] = {"official": lambda: official(lr), "eager": lambda: model(lr)}
    with tempfile.TemporaryDirectory(prefix="adc-bench-deploy-", dir=o.tmp) as tmp:
        if "compile" in o.variants:
            import torch._inductor.config as inductor_config

            log("torch.compile (inductor, freezing on: weights constant-folded and prepacked) ...")
            t0 = time.perf_counter()
            with _inductor_freezing(inductor_config, o.freezing):
                compiled = torch.compile(model)
                with torch.inference_mode():
                    compiled(lr)
            add("compile", 1, lambda: compiled(lr), time.perf_counter() - t0,
                f"inductor, freezing={'on' if o.freezing else 'off'}; setup = compile + first call")
            calls["compile"] = lambda: compiled(lr)
        if "onnxruntime" in o.variants:
            log(f"ONNX export ({o.onnx_exporter} exporter, static {o.lr_size}x{o.lr_size}, colour fix inside) ...")
            t0 = time.perf_counter()
            res = export_model(model, Path(tmp) / "adcsr.onnx", "onnx", o.lr_size, False, "inside",
                               exporter=o.onnx_exporter, source=f"zoo:adcsr ({o.size}, seed 0)", check=True, log=log)
            exports.append(res.record)
            ort_model = load_exported(res.path, "cpu", o.threads)
            add("onnxruntime", 1, lambda: ort_model(lr), time.perf_counter() - t0,
                f"onnxruntime {_ort_version()}, CPUExecutionProvider, ORT_ENABLE_ALL, {o.threads} intra-op threads; "
                "setup = export + parity check + session")
            calls["onnxruntime"] = lambda: ort_model(lr)
        if "torch-export" in o.exports:
            log("torch.export (.pt2) for the full-size parity record ...")
            res = export_model(model, Path(tmp) / "adcsr.pt2", "torch-export", o.lr_size, False, "inside",
                               source=f"zoo:adcsr ({o.size}, seed 0)", check=True, log=log)
            exports.append(res.record)
            gc.collect()
        log(f"phase 1: {', '.join(calls)} x {o.rounds} rounds")
        for name, ts in _interleave(calls, o.rounds, log).items():
            rows[name].times_ms = ts
        calls.pop("compile", None)
        calls.pop("onnxruntime", None)
        with contextlib.suppress(NameError):
            del compiled
        with contextlib.suppress(NameError):
            del ort_model
        gc.collect()
        torch._dynamo.reset()

    if "channels_last" in o.variants:
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        lr_cl = lr.contiguous(memory_format=torch.channels_last)
        add("channels_last", 2, lambda: cl(lr_cl), None, "a copy of the model and the input in channels_last")
        calls = {"official": lambda: official(lr), "eager": lambda: model(lr), "channels_last": lambda: cl(lr_cl)}
        log(f"phase 2: {', '.join(calls)} x {o.rounds} rounds")
        times = _interleave(calls, o.rounds, log)
        rows["channels_last"].times_ms = times["channels_last"]
        rows["official (phase 2)"] = Row("official (phase 2)", 2, times["official"])
        rows["eager (phase 2)"] = Row("eager (phase 2)", 2, times["eager"])
        del cl
    return BenchResult(o, list(rows.values()), label, exports, command, started, time.perf_counter() - t_start,
                       device_name("cpu"))


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
    rows = {r.name: r for r in res.rows}
    where = f"{res.device} [cpu], {o.threads} threads (torch and onnxruntime), fp32, LR {o.lr_size}x{o.lr_size} " \
            f"-> SR {4 * o.lr_size}x{4 * o.lr_size}, batch 1, `{o.size}` AdcSR (random init, seed 0)"
    lines = [f"Generated by: `{res.command}` (started {res.started}, took {res.seconds / 60:.0f} min)\n",
             "# Deploying the AdcSR student on the CPU: runtimes against the official code\n",
             f"Where: {where}; torch {torch.__version__}, onnxruntime {_ort_version()}, Python "
             f"{platform.python_version()}. Official code: {res.official_label}.\n",
             f"Protocol: one untimed call each, then {o.rounds} interleaved rounds (each runtime once per round, "
             "rotated order); every call timed by `compress.profile.latency.measure_latency` (perf_counter). "
             "Ratios are of medians from the same rounds, so machine load from other jobs hits all alike.\n"]
    table = ["| runtime | phase | median (s) | min-max (s) | official / this (same rounds) | eager / this | "
             "max abs vs eager | max abs vs official | setup (s) | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    best = None
    for r in res.rows:
        if not r.times_ms:
            continue
        off = rows["official" if r.phase == 1 else "official (phase 2)"]
        eag = rows["eager" if r.phase == 1 else "eager (phase 2)"]
        speed = off.median_ms / r.median_ms
        if not r.name.startswith(("official", "eager (")) and r.max_abs_vs_eager is not None \
                and r.max_abs_vs_eager <= 1e-3 and (best is None or speed > best[1]):
            best = (r.name, speed)
        table.append(f"| {r.name} | {r.phase} | {_s(r.median_ms)} | {_s(min(r.times_ms))}-{_s(max(r.times_ms))} | "
                     f"{speed:.2f}x | {eag.median_ms / r.median_ms:.2f}x | {_e(r.max_abs_vs_eager)} | "
                     f"{_e(r.max_abs_vs_official)} | {'-' if r.setup_s is None else f'{r.setup_s:.0f}'} | {r.note} |")
    lines.append(f"## Latency per runtime — {where}\n")
    lines += table
    lines.append("\nLegend. official / this > 1: faster than the official code. Phase 2 (channels_last) has its own "
                 "official and eager rows, measured in its own rounds. max abs: on the timed LR, SR in [-1, 1] "
                 "(colour fix included).\n")
    if best:
        goal = "reached" if best[1] >= 1.5 else "not reached"
        lines.append(f"**Fastest adc CPU path within 1e-3 of eager: {best[0]}, {best[1]:.2f}x the official code's "
                     f"speed (goal >= 1.5x: {goal}).**\n")
    if res.exports:
        lines.append(f"## Export parity at full size — {where}\n")
        lines.append("| file | exporter | opset | size | colour fix | max abs vs eager fp32 | tolerance | export (s) |\n"
                     "|---|---|---|---|---|---|---|---|")
        for rec in res.exports:
            par = rec.get("parity") or {}
            lines.append(f"| {rec['export_format']} | {rec['exporter']} | {rec.get('opset') or '-'} | "
                         f"{'dynamic' if rec['dynamic'] else 'x'.join(map(str, rec['lr_size']))} | {rec['color_fix']} | "
                         f"{_e(par.get('max_abs'))} ({par.get('runtime', '-')}) | {par.get('tolerance', '-')} | "
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
    command = "python profiling/bench_deploy.py" + (" " + shlex.join(argv) if argv else "")
    try:
        bad = [v for v in o.variants if v not in VARIANTS]
        if bad:
            raise AdcError(f"--variants {','.join(bad)}: expected a subset of {','.join(VARIANTS)}")
        if o.lr_size < 16 or o.lr_size % 16 or o.threads < 1 or o.rounds < 1:
            raise AdcError("--lr-size must be a multiple of 16; --threads and --rounds >= 1")
        res = run_bench(o, command, log=lambda s: print(s, file=sys.stderr, flush=True))
        path = atomic_write_text(Path(o.out) / "deploy.md", render_markdown(res))
    except AdcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"wrote {path} in {res.seconds / 60:.0f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
