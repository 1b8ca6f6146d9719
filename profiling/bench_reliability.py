"""Hostile inputs and faults, tried for real: writes ``reports/reliability.md``.

    python profiling/bench_reliability.py                       # every section (about 10 min on 2 cores)
    python profiling/bench_reliability.py --sections yaml,sr    # some of them
    python profiling/bench_reliability.py --sections tiling --lr 4000x3000 --model-tiles 6 --batches 1,4

Each section is a function ``(ctx) -> markdown`` in :data:`SECTIONS`; every case row shows what
was tried, the exit code and the one line the command printed, and whether that is the
expected outcome (one ``error:`` line with exit 2, no traceback, no file left half-written or
overwritten). Commands run as subprocesses, like a user's, with the tiny random-weight AdcSR.

Faults that need root (a full disk, a read-only file system) use small tmpfs mounts when
``mount`` works here, and say "simulated" where they fall back to the tests' monkeypatching.
The runner section kills ``compress.run`` (SIGKILL) at several points, damages the state a crash
or a full disk leaves (torn ``DONE.json``, truncated checkpoint) and resumes, comparing the final
weights with an uninterrupted run bit for bit.

Tiling: ``upscale_to_png`` on a large LR mosaic of the RealSR samples with tiny AdcSR in a
subprocess; peak RSS is the process's high-water mark (``ru_maxrss``, everything included).
``--model-tiles K`` runs the first K tile batches through the model and the rest through a
nearest-neighbour stub with the same shapes (as ``profiling/bench_tiling.py``): memory is exact
either way, the full time is extrapolated from the measured per-batch time and labelled so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from profiling.hostile import (REPO, SAMPLES, TINY, Context, Outcome, _WORK, _bomb_png, _env, _listing, _noise_png,
                               _outcome, _row, _table, run_cli, tmpfs)
from profiling.reliability_round2 import ROUND2


# ----------------------------------------------------------------------------- sections


def section_sr_inputs(ctx: Context) -> str:
    """compress.sr on one odd input file at a time."""
    from PIL import Image

    src = ctx.work / "sr_inputs"
    src.mkdir(parents=True, exist_ok=True)
    cases: list[tuple[str, str, Path, int]] = []
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cases.append(("corrupt", "PNG signature then garbage", src / "corrupt.png", 1))
    good = _noise_png(src / "good.png", 48, 40)
    data = good.read_bytes()
    (src / "truncated.png").write_bytes(data[: len(data) // 2])
    cases.append(("truncated", "first half of a valid PNG", src / "truncated.png", 1))
    (src / "empty.png").write_bytes(b"")
    cases.append(("zero-byte", "an empty .png", src / "empty.png", 1))
    deep = (np.random.default_rng(1).integers(0, 65535, (40, 48))).astype(np.uint16)
    Image.fromarray(deep).save(src / "sixteen.png")
    cases.append(("16-bit", "16-bit grayscale PNG 48x40", src / "sixteen.png", 0))
    cases.append(("palette", "P-mode PNG 48x40", _noise_png(src / "palette.png", 48, 40, "P"), 0))
    cases.append(("RGBA", "RGBA PNG 48x40", _noise_png(src / "rgba.png", 48, 40, "RGBA"), 0))
    cases.append(("grayscale", "L-mode JPEG 48x40", _noise_png(src / "gray.jpg", 48, 40, "L"), 0))
    Image.new("RGB", (1, 1), (120, 60, 30)).save(src / "one.png")
    cases.append(("1x1", "a single (120, 60, 30) pixel", src / "one.png", 0))
    Image.new("RGB", (24, 24), (200, 30, 90)).save(src / "flat.png")
    cases.append(("constant", "a flat 24x24 image", src / "flat.png", 0))
    _bomb_png(src / "bomb.png", 30000, 30000)
    cases.append(("huge (decompression bomb)", "PNG header claiming 30000x30000 (900 Mpx), 1 kB file",
                  src / "bomb.png", 1))
    rows = []
    for case, tried, path, expected in cases:
        out = ctx.work / f"sr_out_{path.stem}"
        o = run_cli("compress.sr", [*TINY, "--input", str(path), "--output", str(out)])
        extra, note = True, ""
        if expected == 0:
            with Image.open(out / f"{path.stem}.png") as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float64)
            extra = im.size == (4 * Image.open(path).size[0], 4 * Image.open(path).size[1]) and np.isfinite(arr).all()
            note = f"{im.size[0]}x{im.size[1]} RGB, channel means {tuple(int(v) for v in arr.mean((0, 1)))}"
        else:
            extra = _listing(out) == []
            note = "no output folder left" if extra else f"left: {_listing(out)}"
        rows.append(_row(case, tried, o, expected, extra, note))
        ctx.log(f"sr input {case}: rc {o.rc}")
    return ("## compress.sr: odd input files (finding 5 and the usual suspects)\n\nOne file per run (`python -m compress.sr --model adcsr --size tiny "
            "--input FILE --output DIR`). Unreadable files are skipped with one line; a run that wrote nothing "
            "exits 1.\n\n" + _table(rows))


def section_sr_faults(ctx: Context) -> str:
    """Output folders that cannot be used, collisions, a full disk, Ctrl-C."""
    w = ctx.work / "sr_faults"
    lr = _noise_png(w / "in" / "x.jpg", 64, 48)
    rows = []
    # Output is a file / under a file.
    (w / "afile").write_text("keep me")
    o = run_cli("compress.sr", [*TINY, "--input", str(lr), "--output", str(w / "afile")])
    rows.append(_row("unwritable output", "--output is an existing file", o, 2,
                     (w / "afile").read_text() == "keep me" and not o.model_loaded,
                     "file untouched; reported before the model loaded"))
    # Read-only file system.
    with tmpfs(w / "ro", "1m", readonly=True) as mounted:
        if mounted:
            o = run_cli("compress.sr", [*TINY, "--input", str(lr), "--output", str(w / "ro" / "out")])
            rows.append(_row("unwritable output", "--output inside a read-only tmpfs (EROFS)", o, 2,
                             not o.model_loaded, "reported before the model loaded"))
        else:
            ctx.notes.append("read-only mount not allowed here: EROFS/EACCES covered by tests/test_sr_hostile.py "
                             "(simulated)")
    # Collision with an unrelated file in the input's folder.
    _noise_png(w / "in" / "x.png", 8, 8, seed=3)
    before = (w / "in" / "x.png").read_bytes()
    o = run_cli("compress.sr", [*TINY, "--input", str(lr), "--output", str(w / "in")])
    rows.append(_row("file-input collision", "--input in/x.jpg --output in, with an unrelated in/x.png", o, 2,
                     (w / "in" / "x.png").read_bytes() == before, "in/x.png unchanged"))
    o = run_cli("compress.sr", [*TINY, "--input", str(w / "in"), "--output", str(w / "in")])
    rows.append(_row("output = input folder", "--input in --output in", o, 2))
    # Disk full.
    with tmpfs(w / "full", "64k") as mounted:
        if mounted:
            big = _noise_png(w / "in2" / "big.png", 128, 128, seed=4)
            o = run_cli("compress.sr", [*TINY, "--input", str(big), "--output", str(w / "full" / "out")])
            left = _listing(w / "full" / "out")
            rows.append(_row("disk full", "--output on a 64 kB tmpfs; the 512x512 PNG does not fit", o, 2,
                             left == [], f"left in the output folder: {left or 'nothing'}"))
        else:
            ctx.notes.append("tmpfs not mountable here: ENOSPC covered by tests/test_sr_hostile.py (simulated)")
    # Ctrl-C while tiles run.
    rows.append(_ctrl_c_row(ctx, w))
    return ("## compress.sr: output folder, collisions, full disk, Ctrl-C (findings 2, 3, 4)\n\n"
            "The output folder is created and test-written before the model loads.\n\n" + _table(rows))


def _ctrl_c_row(ctx: Context, w: Path) -> str:
    lr = _noise_png(w / "in3" / "c.png", 256, 256, seed=5)
    out = w / "ctrlc"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "compress.sr", *TINY, "--input", str(lr), "--output", str(out),
                             "--tile", "64"], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # the model is loaded once it warns about random weights
        seen.append(line)
        if "random weights" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out_s, err_s = proc.communicate(timeout=120)
    o = _outcome(proc.returncode, out_s, "".join(seen) + err_s, time.perf_counter() - t0)
    left = _listing(out)
    return _row("Ctrl-C", "SIGINT 1 s after the model loaded, while 64-px tiles run", o, 130, left == [],
                f"left in the output folder: {left or 'nothing'}")


def section_evaluate(ctx: Context) -> str:
    """compress.evaluate: name pairing and nothing computable."""
    import pandas as pd
    from PIL import Image

    w = ctx.work / "evaluate"
    hr = SAMPLES / "HR"
    names = sorted(p.name for p in hr.glob("*.png"))
    rows = []

    def bicubic(dst: Path, rename: Callable[[int, str], str]) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            with Image.open(SAMPLES / "LR" / name) as im:
                im.resize((im.size[0] * 4, im.size[1] * 4), Image.BICUBIC).save(dst / rename(i, name))
        return dst

    def mean_psnr(out: Path) -> str:
        return f"{pd.read_csv(out / 'summary.csv').set_index('metric').loc['psnr', 'value']:.2f} dB"

    order = [5, 0, 3, 1, 4, 2]  # unrelated names whose sorted order is not the HR order: the case
    cases = [
        ("same names", lambda i, n: n, 0, "by file name"),
        ("fixed prefix and suffix", lambda i, n: f"sr_{Path(n).stem}_x4.png", 0,
         "by file name without the fixed parts"),
        ("unrelated names", lambda i, n: f"img{order[i]:02d}.png", 0, "by sorted order"),
    ]
    for case, rename, expected, rule in cases:
        sr = bicubic(w / case.replace(" ", "_").replace("/", "_"), rename)
        out = sr.with_name(sr.name + "_report")
        o = run_cli("compress.evaluate", ["--sr", str(sr), "--hr", str(hr), "--metrics", "psnr", "--out", str(out)])
        pairing = pd.read_csv(out / "summary.csv")["pairing"][0] if o.rc == 0 else "-"
        rows.append(_row("evaluate: " + case, f"6 bicubic SR images, names like `{rename(0, names[0])}`", o, expected,
                         rule in pairing, f"pairing: {pairing}; mean PSNR-Y {mean_psnr(out) if o.rc == 0 else '-'}"))
    partial = bicubic(w / "partial", lambda i, n: n if i else "other.png")
    o = run_cli("compress.evaluate", ["--sr", str(partial), "--hr", str(hr), "--metrics", "psnr",
                                      "--out", str(w / "partial_report")])
    rows.append(_row("evaluate: partial name match", "5 names match, one does not", o, 2))
    env_no_pyiqa = ctx.work / "no_pyiqa"
    env_no_pyiqa.mkdir(exist_ok=True)
    (env_no_pyiqa / "pyiqa.py").write_text("raise ImportError('pyiqa hidden for this check')\n")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(env_no_pyiqa) + (os.pathsep + old if old else "")
    try:
        o = run_cli("compress.evaluate", ["--sr", str(hr), "--hr", str(hr), "--metrics", "lpips",
                                          "--out", str(w / "lpips_report")])
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    rows.append(_row("evaluate: nothing computable", "--metrics lpips without pyiqa", o, 2,
                     not (w / "lpips_report").exists(), "no report written"))
    return ("## compress.evaluate: pairing and nothing computable (finding 9)\n\nSR = bicubic x4 of the 6 RealSR "
            "sample LRs, HR = the sample HRs (names `Canon_001_LR4.png`, ...). With unrelated names nothing can find "
            "the right pairs: the warning is the fix. Where a fixed affix changes the sorted order (SR `10_sr, "
            "1_sr, 2_sr` against HR `img1, img10, img2`), the pairs are still right, by name: "
            "`tests/test_evaluate.py::test_pairs_are_by_name_whatever_the_sorted_order`.\n\n" + _table(rows))


def section_yaml(ctx: Context) -> str:
    """Recipe YAML through compress.yaml_io.load_yaml and compress.config.from_dict, in process."""
    import yaml

    from compress.config import from_dict
    from compress.errors import AdcError
    from compress.yaml_io import load_yaml

    w = ctx.work / "yaml"
    w.mkdir(parents=True, exist_ok=True)
    levels = ", ".join(f"&a{i} [" + ", ".join([f"*a{i - 1}" if i else "x"] * 9) + "]" for i in range(9))

    @dataclass
    class Head:
        name: str = "x"
        seed: int = 0
        lr: float = 1e-4
        latency: str = "auto"

    cases = [
        ("alias bomb", "`seed: [&a0 [x,...], &a1 [*a0 x9], ...]` (9^9 values expanded)",
         f"name: bomb\nseed: [{levels}]\n".encode()),
        ("50 MB recipe", "50 MB of `x: 1` lines", None),
        ("non-UTF-8", "`name: café` in Latin-1", "seed: 1\nname: caf\xe9\n".encode("latin-1")),
        ("duplicate key", "`seed` given twice", b"name: a\nseed: 1\nseed: 2\n"),
        ("deep nesting", "100 000 `[`", b"[" * 100_000),
        ("control character", "a BEL byte in a value", b"name: a\x07b\n"),
        ("YAML 1.1 float", "`lr: 1e-4`", b"name: a\nlr: 1e-4\n"),
        ("YAML 1.1 boolean", "`latency: off`", b"name: a\nlatency: off\n"),
        ("NaN learning rate", "`lr: .nan`", b"name: a\nlr: .nan\n"),
        ("infinite value", "`lr: .inf`", b"name: a\nlr: -.inf\n"),
    ]
    rows = []
    for case, tried, data in cases:
        path = w / f"{case.replace(' ', '_')}.yaml"
        if data is None:
            with open(path, "wb") as fh:
                fh.write(b"x: 1\n" * (10 * 2**20))
        else:
            path.write_bytes(data)
        t0 = time.perf_counter()
        try:
            value = from_dict(Head, load_yaml(path), "recipe")
            line, rc = f"read: lr={value.lr!r}, latency={value.latency!r}", 0
        except AdcError as exc:
            line, rc = f"error: {exc}", 2
        dt = time.perf_counter() - t0
        expected = 0 if case.startswith("YAML 1.1") else 2
        o = Outcome(rc, line.replace(str(w) + "/", ""), False, dt)
        rows.append(_row(case, tried, o, expected, dt < 1.0, f"{dt * 1000:.0f} ms"))
    safe = yaml.safe_load("lr: 1e-4\nlatency: off\n")
    return ("## Recipe YAML (finding 7, parsing part)\n\n`compress.yaml_io.load_yaml` + `compress.config.from_dict` "
            "in process (exit 2 = an `AdcError`, as the CLIs report it). For comparison, `yaml.safe_load` reads "
            f"`lr: 1e-4` as {safe['lr']!r} and `latency: off` as {safe['latency']!r}. `compress.run` reads recipes "
            "and `--set` values through these helpers (`compress/recipe.py`).\n\n"
            + _table(rows))


def section_artifacts(ctx: Context) -> str:
    """compress.io: byte-identical artifacts, file modes, a real full disk."""
    import torch

    from compress.io import WriteError, atomic_torch_save, save_safetensors

    w = ctx.work / "artifacts"
    w.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    a, b = atomic_torch_save(state, w / "a" / "net_params_1.pkl"), atomic_torch_save(state, w / "b" / "net.ckpt")
    meta = {f"k{i}": str(i) for i in range(8)}
    s1 = save_safetensors(state, w / "one.safetensors", metadata=meta)
    s2 = save_safetensors(dict(reversed(list(state.items()))), w / "two.safetensors",
                          metadata=dict(reversed(list(meta.items()))))
    lines = [
        "## Artifacts (findings 8 and 10, `compress/io.py`)\n",
        f"- `torch.save` archives of the same state under two names: byte-identical: "
        f"**{a.read_bytes() == b.read_bytes()}** (records are named `archive/`, not after the temp file).",
        f"- safetensors with the same tensors and metadata given in opposite orders: byte-identical: "
        f"**{s1.read_bytes() == s2.read_bytes()}** (header keys sorted); mode "
        f"`{oct(s1.stat().st_mode & 0o777)}` under umask `{oct(_umask())}`.",
        "- every atomic write: temp file -> fsync -> rename -> fsync of the folder "
        "(`tests/test_io.py::test_atomic_path_fsyncs_the_file_before_the_rename_and_the_folder_after`).",
    ]
    with tmpfs(w / "full", "1m") as mounted:
        if mounted:
            save_safetensors({"a": torch.ones(10)}, w / "full" / "w.safetensors")
            good = (w / "full" / "w.safetensors").read_bytes()
            try:
                save_safetensors({"a": torch.ones(1_000_000)}, w / "full" / "w.safetensors")
                msg = "no error (!)"
            except WriteError as exc:
                msg = str(exc).replace(str(w) + "/", "")
            kept = (w / "full" / "w.safetensors").read_bytes() == good
            lines.append(f"- a 4 MB safetensors onto a 1 MiB tmpfs that holds an earlier good file: `{msg}`; "
                         f"the earlier file is intact: **{kept}**; files left: {_listing(w / 'full')}.")
        else:
            lines.append("- full disk: tmpfs not mountable here; covered by the simulated tests in `tests/test_io.py`.")
    return "\n".join(lines) + "\n"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def section_tiling(ctx: Context) -> str:
    """upscale_to_png on a large LR, in a subprocess per batch size: peak RSS and time."""
    w, h = ctx.lr
    out = ctx.work / "tiling"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for batch in ctx.batches:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-tiling", f"{w}x{h}", "--model-tiles",
               str(ctx.model_tiles), "--tile", str(ctx.tile), "--batches", str(batch), "--work", str(out)]
        ctx.log("tiling: " + shlex.join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(single_thread=False),
                              timeout=3600)
        if proc.returncode != 0:
            return f"## Tiling\n\nmeasurement failed (exit {proc.returncode}):\n\n```\n{proc.stderr[-3000:]}\n```\n"
        results.append((batch, json.loads(proc.stdout.strip().splitlines()[-1])))
    r0 = results[0][1]
    gib = 2**30
    rows = ["| --batch | peak RSS during the call | resident before | model time per tile | measured | "
            "extrapolated full run |", "|---|---|---|---|---|---|"]
    for batch, r in results:
        rows.append(f"| {batch} | **{r['peak_rss'] / 1e9:.2f} GB** | {r['rss_before'] / 1e9:.2f} GB | "
                    f"{r['per_batch'] / batch:.1f} s | {r['wall']:.0f} s ({r['model_batches']} of {r['batches']} "
                    f"batches through the model) | {r['extrapolated'] / 60:.0f} min |")
    lines = [
        f"## Tiling memory and time: {w}x{h} LR -> {4 * w}x{4 * h} SR, tiny AdcSR (finding 6)\n",
        f"Command: `python profiling/bench_reliability.py --sections tiling --lr {w}x{h} --model-tiles "
        f"{ctx.model_tiles}`: `upscale_to_png(model, lr, path, tile={ctx.tile}, overlap=32, batch=B)`, what "
        f"`python -m compress.sr --tile {ctx.tile} --batch B` runs per image; {r0['tiles']} tiles. CPU, torch "
        f"{r0['torch']}, {r0['threads']} threads, load average {r0['load']:.1f} on 2 shared cores (the times "
        f"depend on that load; the memory does not).\n",
        *rows,
        "",
        "- `compress.sr` defaults to `--batch 1` on a CPU (4 on a GPU), so a CPU run of this image stays under "
        "the 1.5 GB goal without a flag.",
        f"- Peak RSS is the process's high-water mark, reset at the call ({r0['method']}); 'resident before' "
        f"is Python, torch, the tiny model and the {w}x{h} fp32 LR (0.14 GB). The goal was under 1.5 GB.",
        f"- Never allocated: the full fp32 output ({r0['full_fp32'] / gib:.2f} GiB) and its uint8 copy "
        f"({r0['full_uint8'] / gib:.2f} GiB), which the old path allocated whatever the tile. The stitcher "
        f"holds one tile row ({r0['band_bytes'] / 2**20:.0f} MiB); the colour fix's uncorrected rows wait in an "
        f"unnamed temp file ({r0['spill_bytes'] / gib:.2f} GiB on disk, not in memory); tiles are cut from the "
        f"unpadded LR. What grows with --batch is the model's own activations (tiny AdcSR's first-level "
        f"attention over a {ctx.tile}-px tile: about 0.33 GB per tile).",
        f"- PNG written: {r0['png_w']}x{r0['png_h']}, {r0['png_bytes'] / 2**20:.0f} MiB (mostly stub tiles, so it "
        f"compresses well), decoded back by Pillow: {r0['png_ok']}.",
        f"- Time: after the first {ctx.model_tiles} batches, tiles go through a nearest-neighbour stub of the "
        f"same shapes; the full run is extrapolated from the median model time per batch. Stitching, colour "
        f"statistics, the spill and PNG writing of the 192 Mpx output took {r0['engine'] / 60:.1f} min of it.",
    ]
    return "\n".join(lines) + "\n"


def measure_tiling(lr_size: str, model_tiles: int, tile: int, batch: int, work: Path) -> dict:
    """Runs in its own process (``--measure-tiling``); prints one JSON line."""
    import resource

    import torch
    from PIL import Image

    from compress.inference import TileGrid, reflect_pad_to_multiple, upscale_to_png
    from compress.inference import engine
    from compress.profile.latency import peak_memory
    from compress.zoo.adcsr import build_adcsr
    from profiling.bench_tiling import FirstBatchesThenStub, make_lr

    width, height = (int(v) for v in lr_size.lower().split("x"))
    lr = make_lr(width, height)
    torch.manual_seed(0)
    model = build_adcsr("tiny")
    run_model = FirstBatchesThenStub(model, model_tiles)
    padded, _ = reflect_pad_to_multiple(lr[None], 16)
    grid = TileGrid.build(padded.shape[-2], padded.shape[-1], tile, 32, 16)
    del padded
    spill_bytes = []
    real_spill = engine._Spill

    class CountingSpill(real_spill):
        def __init__(self, total, ram, folder):
            super().__init__(total, ram, folder)
            spill_bytes.append(total if self.on_disk else 0)

    engine._Spill = CountingSpill
    path = work / "sr.png"
    t0 = time.perf_counter()
    with peak_memory("cpu") as mem:  # the kernel's high-water mark, reset at entry: absolute peak of the call
        upscale_to_png(run_model, lr, path, tile=tile, overlap=32, batch=batch, log=lambda m: None)
    wall = time.perf_counter() - t0
    peak, rss_before = mem.peak_bytes, mem.start_bytes
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Image.MAX_IMAGE_PIXELS = None  # 192 Mpx is over Pillow's decompression-bomb limit; this one is ours
    with Image.open(path) as im:
        png_w, png_h = im.size
        im.load()  # decodes every row (after the peak was taken)
        png_ok = im.mode == "RGB" and (png_w, png_h) == (4 * width, 4 * height)
    calls = run_model.calls[1:] or run_model.calls
    per_batch = float(np.median(calls))
    n_batches = -(-len(grid) // batch)
    engine_s = wall - sum(run_model.calls)
    result = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load": os.getloadavg()[0],
        "tiles": len(grid), "batches": n_batches, "model_batches": len(run_model.calls),
        "peak_rss": peak, "rss_before": rss_before, "lifetime_peak": lifetime_peak, "method": mem.method,
        "full_fp32": 3 * 16 * width * height * 4,
        "full_uint8": 3 * 16 * width * height, "band_bytes": 3 * grid.tile_h * 4 * grid.width * 4 * 4,
        "spill_bytes": spill_bytes[0] if spill_bytes else 0, "png_bytes": path.stat().st_size,
        "png_w": png_w, "png_h": png_h, "png_ok": png_ok, "wall": wall, "per_batch": per_batch,
        "engine": engine_s, "extrapolated": engine_s + per_batch * n_batches,
    }
    path.unlink()
    return result


RUNNER_RECIPE = """
name: killed
seed: 0
device: cpu
threads: 1
models: {{family: osediff, size: tiny}}
task: {{lr_size: 32}}
data: {{train_hr: [{hr}]}}
stages:
  - remove: {{init: teacher}}
  - prune: {{}}
  - distill: {{crop: 64, prompt: empty, adv_weight: 0.1, adv_start: 3,
              engine: {{max_steps: 8, batch_size: 2, checkpoint_every: 2, keep_checkpoints: 2}}}}
"""


def _student(run: Path) -> dict:
    from safetensors.torch import load_file

    return {part: load_file(str(run / "02-distill" / "student" / part / "weights.safetensors"))
            for part in ("unet", "decoder")}


def _same(a: dict, b: dict) -> bool:
    return all(a[p].keys() == b[p].keys() and all(bool((a[p][k] == b[p][k]).all()) for k in a[p]) for p in a)


def section_runner(ctx: Context) -> str:
    """kill -9 of ``compress.run`` at several points (and the states a crash or a full disk leaves),
    then ``--resume``: exit code, and whether the final student equals an uninterrupted run's, bit for bit."""
    import shutil

    recipe = ctx.work / "runner.yaml"
    recipe.write_text(RUNNER_RECIPE.format(hr=SAMPLES / "HR"))
    straight = ctx.work / "runner-straight"
    shutil.rmtree(straight, ignore_errors=True)
    o = run_cli("compress.run", [str(recipe), "--out", str(straight)])
    if o.rc != 0:
        return f"## compress.run: kill -9 points and resume\n\nthe uninterrupted run failed: `{o.line}`\n"
    ref = _student(straight)

    def killed_at(name: str, ready: Callable[[Path], bool]) -> Path:
        run = ctx.work / f"runner-{name}"
        shutil.rmtree(run, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-m", "compress.run", str(recipe), "--out", str(run)], cwd=REPO,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while not ready(run) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return run

    def copy_of_straight(name: str) -> Path:
        run = ctx.work / f"runner-{name}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(straight, run)
        return run

    ckpt = lambda run, n: list(run.glob("02-distill/checkpoints/step-*/trainer_state.json"))  # noqa: E731
    cases: list[tuple[str, str, Path]] = []
    cases.append(("kill -9 in the middle of prune", "SIGKILL once prune has started",
                  killed_at("prune", lambda r: (r / "01-prune").is_dir())))
    cases.append(("kill -9 mid-distill", "SIGKILL after distill's first checkpoint (step 2 of 8)",
                  killed_at("mid", lambda r: bool(ckpt(r, 1)))))
    run = killed_at("ckpt", lambda r: bool(list(r.glob("02-distill/checkpoints/.tmp-*"))))
    cases.append(("kill -9 while a checkpoint is written", "SIGKILL as soon as a `.tmp-step-*` folder appears", run))
    run = copy_of_straight("done")
    (run / "02-distill" / "DONE.json").unlink()
    cases.append(("after the last checkpoint, before DONE.json", "the finished run with distill's DONE.json removed", run))
    run = copy_of_straight("torn-done")
    done = run / "02-distill" / "DONE.json"
    done.write_text(done.read_text()[:40])
    cases.append(("a torn DONE.json", "distill's DONE.json cut to 40 bytes", run))
    run = killed_at("torn-ckpt", lambda r: len(ckpt(r, 2)) >= 2)
    newest = max(run.glob("02-distill/checkpoints/step-*"), key=lambda p: p.name)
    for f in newest.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:1000])
    cases.append(("a truncated newest checkpoint (full disk, cut copy)",
                  "SIGKILL after 2 checkpoints, then the newest one's weights cut to 1000 bytes", run))
    rows = []
    for case, tried, run in cases:
        o = run_cli("compress.run", [str(recipe), "--out", str(run), "--resume"])
        same = o.rc == 0 and _same(_student(run), ref)
        rows.append(_row(case, tried + "; then `--resume`", o, 0, same,
                         "final student identical to the uninterrupted run's" if same else "final student differs"))
    intr = ctx.work / "runner-sigint"
    shutil.rmtree(intr, ignore_errors=True)
    proc = subprocess.Popen([sys.executable, "-m", "compress.run", str(recipe), "--out", str(intr)], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (intr / "01-prune").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate()
    rows.append(_row("Ctrl-C (SIGINT) during a run", "SIGINT once prune has started", _outcome(proc.returncode, out, err, 0),
                     130, note="finished stages kept"))
    return ("## compress.run: kill -9 points and resume (findings 1, 8)\n\n"
            "A tiny recipe (remove -> prune -> distill, 8 steps, a checkpoint every 2) killed or damaged at each "
            "point, then resumed with `--resume`; the final student's weights (`02-distill/student/`) are compared "
            "bit for bit with an uninterrupted run's.\n\n" + _table(rows))


SECTIONS: dict[str, Callable[[Context], str]] = {
    "sr": section_sr_inputs,
    "faults": section_sr_faults,
    "evaluate": section_evaluate,
    "yaml": section_yaml,
    "artifacts": section_artifacts,
    "tiling": section_tiling,
    "runner": section_runner,
    **ROUND2,  # issue 22's second round: profiling/reliability_round2.py
}


def _heading_key(heading: str) -> str:
    return heading.split(" (")[0].strip()


def merge_sections(report: str, parts: list[str]) -> str:
    """``report`` with each of ``parts`` (a ``## `` section) in place of the section of the same title
    (the text before any parenthesis), or appended when the report has none."""
    import re as _re

    chunks = _re.split(r"(?m)^(?=## )", report)
    for part in parts:
        key = _heading_key(part.splitlines()[0])
        for i, chunk in enumerate(chunks):
            if chunk.startswith("## ") and _heading_key(chunk.splitlines()[0]) == key:
                chunks[i] = part.rstrip("\n") + "\n\n"
                break
        else:
            chunks.append(part.rstrip("\n") + "\n")
    return "".join(chunks).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "reliability.md")
    p.add_argument("--lr", default="4000x3000", help="LR size of the tiling measurement (4000x3000)")
    p.add_argument("--model-tiles", type=int, default=6, help="tile batches through tiny AdcSR (6; 0 = all)")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--batches", default="1,4", help="--batch values measured in the tiling section (1,4)")
    p.add_argument("--measure-tiling", metavar="WxH", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_tiling:
        print(json.dumps(measure_tiling(args.measure_tiling, args.model_tiles or 10**9, args.tile,
                                        int(args.batches), args.work)))
        return 0
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adc-reliability-") as tmp:
        ctx = Context(Path(tmp), tuple(int(v) for v in args.lr.lower().split("x")), args.model_tiles, args.tile,
                      tuple(int(b) for b in args.batches.split(",")), log=lambda m: print(m, file=sys.stderr, flush=True))
        _WORK[0] = str(ctx.work)
        parts = [SECTIONS[n](ctx) for n in names]
    head = [
        "# Reliability: hostile inputs and faults",
        "",
        f"Made by `python profiling/bench_reliability.py{' --sections ' + ','.join(names) if len(names) < len(SECTIONS) else ''}` "
        f"in {time.perf_counter() - t0:.0f} s on {platform.machine()} ({os.cpu_count()} CPUs, shared), "
        f"Python {platform.python_version()}, as {'root' if os.geteuid() == 0 else 'a normal user'}.",
        "Expected outcome of every failure: one `error:` line naming the file, key or value, exit 2 (Ctrl-C: "
        "`interrupted`, 130; a run that only skipped unreadable images: exit 1), no traceback, nothing "
        "half-written, nothing overwritten. The outcome column says whether that held.",
        "",
    ]
    notes = [f"- note: {n}" for n in ctx.notes]
    from compress.io import atomic_write_text

    if len(names) < len(SECTIONS) and args.out.exists():
        # A partial run re-measures its sections inside the existing report; the others stay as they were.
        old = args.out.read_text()
        this = head[2].split(" in ")[0].replace("Made by ", "") + f" in {time.perf_counter() - t0:.0f} s"
        text = merge_sections(old, parts)
        lines = text.split("\n")
        first_section = next((i for i, ln in enumerate(lines) if ln.startswith("## ")), len(lines))
        earlier = [ln for ln in lines[:first_section] if ln.startswith("Sections re-measured by")]
        kept_head = [ln for ln in lines[:first_section] if not ln.startswith("Sections re-measured by")]
        # every partial run stays listed (earlier ones first): which command measured which section
        runs = [r for r in (earlier[0].removeprefix("Sections re-measured by ").removesuffix(
            "; the rest by the full command.").split("; ") if earlier else []) if r]
        runs = [r for r in runs if r.split(" in ")[0] != this.split(" in ")[0]] + [this]
        line = "Sections re-measured by " + "; ".join(runs) + "; the rest by the full command."
        atomic_write_text(args.out, "\n".join(kept_head[:3] + [line] + kept_head[3:] + lines[first_section:]))
    else:
        atomic_write_text(args.out, "\n".join(head + notes + ([""] if notes else [])) + "\n" + "\n".join(parts))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
