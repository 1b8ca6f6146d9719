"""Hostile inputs, round 2 (issue 22): model files that would run code, user files in the way, two
processes on one folder, images that used to score wrong, and numbers out of range.

Each section is ``(ctx) -> markdown`` like those of ``profiling/bench_reliability.py``, which runs
them (``--sections models2,images2,folders2,flags2,concurrency2``). A case states what adc must do;
the outcome column says whether it did, checked from the files (a marker a pickle would have
written, bytes of a user's file before and after, the PSNR a reader gives).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from profiling.hostile import (REPO, STUDENT_RUN, TINY, Context, _env, _evil, _listing, _noise_png, _row, _table,
                               pt2_with_pickled_inputs, pt2_with_pickled_weight, run_cli)

SR = "compress.sr"


def _export_pt2(ctx: Context) -> Path:
    path = ctx.work / "models2" / "tiny.pt2"
    if not path.is_file():
        o = run_cli("compress.export", ["adcsr", "--size", "tiny", "--format", "torch-export", "--lr-size", "32",
                                        "--out", str(path)])
        assert o.rc == 0, o.line
    return path


def section_models(ctx: Context) -> str:
    """Model files that would run code on load, or are not what their name says."""
    w = ctx.work / "models2"
    w.mkdir(parents=True, exist_ok=True)
    lr = _noise_png(w / "in" / "a.png", 32, 32)
    pt2 = _export_pt2(ctx)
    rows = []

    def case(name: str, tried: str, model: Path, marker: Path | None = None, expected: int = 2) -> None:
        out = w / f"out_{len(rows)}"
        o = run_cli(SR, ["--model", str(model), "--input", str(lr), "--output", str(out)])
        ok = marker is None or not marker.exists()
        note = ("no code ran (the marker file was never created)" if marker is not None and ok else
                "**the marker exists: code ran**" if marker is not None else "")
        rows.append(_row(name, tried, o, expected, ok and (expected == 0 or not _listing(out)), note))
        ctx.log(f"models2 {name}: rc {o.rc}")

    # .pt2 archives: every path on which torch.export.load unpickles with weights_only=False
    m1 = w / "ran_weight"
    evil1 = pt2_with_pickled_weight(pt2, w / "weight.pt2", m1)
    case(".pt2: pickled weight", "a weight marked `use_pickle` whose payload opens a file when unpickled", evil1, m1)
    m2 = w / "ran_inputs"
    evil2 = pt2_with_pickled_inputs(pt2, w / "inputs.pt2", m2)
    case(".pt2: sample inputs", "sample inputs that fail the safe load (torch falls back to an unsafe one)",
         evil2, m2)
    m3 = w / "ran_constant"
    evil3 = w / "legacy.pt2"
    with zipfile.ZipFile(pt2) as zin, zipfile.ZipFile(evil3, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
        zout.writestr(f"{prefix}/data/constants/model.pt", _evil(m3))  # the legacy constants file
    case(".pt2: legacy constants", "a legacy `constants/model.pt` pickle added to the archive", evil3, m3)
    (w / "garbage.pt2").write_bytes(b"PK\x03\x04 not a zip archive at all")
    case(".pt2: not a zip", "zip magic, then garbage", w / "garbage.pt2")
    data = pt2.read_bytes()
    (w / "half.pt2").write_bytes(data[: len(data) // 2])
    case(".pt2: truncated", "the first half of a valid archive", w / "half.pt2")
    (w / "text.onnx").write_text("this is not a protobuf\n")
    case(".onnx: text", "a text file named .onnx", w / "text.onnx")
    # official-layout folders
    off = w / "official"
    off.mkdir(exist_ok=True)
    m4 = w / "ran_pkl"
    (off / "net_params_200.pkl").write_bytes(_evil(m4))
    (off / "halfDecoder.ckpt").write_bytes(_evil(m4))
    case("official: pickle with code", "`net_params_200.pkl` and `halfDecoder.ckpt` whose pickles open a file", off, m4)
    only = w / "official_half"
    only.mkdir(exist_ok=True)
    (only / "net_params_1.pkl").write_bytes(b"")
    case("official: half of the pair", "`net_params_1.pkl` without `halfDecoder.ckpt`", only)
    # a run's student folder, damaged
    stud = w / "student"
    stud.mkdir(exist_ok=True)
    (stud / "student.json").write_text("{ not json")
    case("student.json not JSON", "a `student/student.json` with a syntax error", stud)
    return ("## Round 2: model files (issue 22, item 1)\n\nOne `python -m compress.sr --model FILE --input "
            "a.png --output DIR` per case. A crafted file's pickle would create a marker file when loaded; "
            "every such file must be refused with one line and the marker must never appear. The `.pt2` cases "
            "cover each path on which `torch.export.load` unpickles with `weights_only=False` (adc loads under "
            "torch's `TORCH_FORCE_WEIGHTS_ONLY_LOAD`).\n\n" + _table(rows))


def section_images(ctx: Context) -> str:
    """Images that used to be read differently by evaluate and sr, or stopped a run."""
    from PIL import Image

    w = ctx.work / "images2"
    rng = np.random.default_rng(0)
    hr8 = (rng.random((96, 96, 3)) * 255).astype(np.uint8)
    gray = (np.linspace(0, 1, 96 * 96).reshape(96, 96) * 65535).astype(np.uint16)
    rows = []

    def evaluate(name: str, tried: str, sr: np.ndarray | Image.Image, hr_writer, want: float) -> None:
        d = w / name.replace(" ", "_").replace(":", "")
        (d / "sr").mkdir(parents=True, exist_ok=True)
        (d / "hr").mkdir(parents=True, exist_ok=True)
        (sr if isinstance(sr, Image.Image) else Image.fromarray(sr)).save(d / "sr" / "x.png")
        hr_writer(d / "hr")
        o = run_cli("compress.evaluate", ["--sr", str(d / "sr"), "--hr", str(d / "hr"), "--metrics", "psnr",
                                          "--out", str(d / "report")])
        got = None
        if o.rc == 0:
            import pandas as pd

            got = float(pd.read_csv(d / "report" / "summary.csv").set_index("metric").loc["psnr", "value"])
        ok = got is not None and abs(got - want) <= 0.1
        rows.append(_row(name, tried, o, 0, ok, f"PSNR {got:.2f} dB, the 8-bit upright reference {want:.2f} dB"
                         if got is not None else "no score"))
        ctx.log(f"images2 {name}: rc {o.rc}")

    noisy = np.clip(hr8.astype(np.int16) + rng.integers(-8, 9, hr8.shape), 0, 255).astype(np.uint8)
    ref = 10 * np.log10(255 ** 2 / np.mean((_y(noisy) - _y(hr8)) ** 2))
    evaluate("evaluate: 16-bit RGB HR", "the HR saved as 16-bit RGB PNG (values x257)", noisy,
             lambda d: _write_png16_rgb(d / "x.png", hr8), ref)
    exif = Image.fromarray(np.rot90(hr8, 1).copy())  # stored rotated, EXIF says rotate back
    ex = exif.getexif()
    ex[0x0112] = 6  # orientation: rotate 90 CW to display

    def write_exif(d: Path) -> None:
        exif.save(d / "x.png", exif=ex.tobytes())

    evaluate("evaluate: EXIF orientation", "the HR stored rotated with EXIF orientation 6", noisy, write_exif, ref)
    g8 = (gray // 257).astype(np.uint8)
    gnoisy = np.clip(g8.astype(np.int16) + rng.integers(-8, 9, g8.shape), 0, 255).astype(np.uint8)
    # the reference: PSNR on Y of the gray SR against the HR at full depth (gray / 257 on the 8-bit scale)
    gref = 10 * np.log10(255 ** 2 / np.mean((_y(np.stack([gnoisy] * 3, -1)) - _y(np.stack([gray / 257.0] * 3, -1))) ** 2))
    evaluate("evaluate: 16-bit grayscale HR", "a 16-bit grayscale PNG HR (reference: the HR at full depth)", Image.fromarray(gnoisy).convert("RGB"),
             lambda d: Image.fromarray(gray).save(d / "x.png"), gref)

    # compress.sr: one bad image among good ones; alpha; CMYK; a PNG that is a JPEG; odd names
    src = w / "sr_in"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        _noise_png(src / f"good{i}.png", 24, 24, seed=i)
    nan = np.full((24, 24), np.nan, dtype=np.float32)
    Image.fromarray(nan, "F").save(src / "bad_nan.tif")
    o = run_cli(SR, [*TINY, "--input", str(src), "--output", str(w / "sr_out")])
    written = sorted(p.name for p in (w / "sr_out").glob("*.png"))
    rows.append(_row("sr: a NaN image among good ones", "a float TIFF of NaN between two good PNGs", o, 0,
                     written == ["good0.png", "good1.png"], f"written: {', '.join(written) or 'nothing'}"))
    cases = []
    Image.fromarray((rng.random((20, 20, 4)) * 255).astype(np.uint8), "RGBA").save(w / "rgba.png")
    cases.append(("sr: RGBA", "an RGBA PNG with a random alpha", w / "rgba.png"))
    Image.fromarray((rng.random((20, 20, 2)) * 255).astype(np.uint8), "LA").save(w / "la.png")
    cases.append(("sr: gray + alpha", "an LA PNG", w / "la.png"))
    Image.fromarray(hr8[:20, :20]).convert("CMYK").save(w / "cmyk.jpg")
    cases.append(("sr: CMYK JPEG", "a CMYK JPEG 20x20", w / "cmyk.jpg"))
    Image.fromarray(hr8[:20, :20]).save(w / "really_a_jpeg.png", format="JPEG")
    cases.append(("sr: wrong suffix", "JPEG bytes in a file named .png", w / "really_a_jpeg.png"))
    odd = w / "odd names"
    _noise_png(odd / "ünï cödé ✓.png", 20, 20)
    cases.append(("sr: unicode and spaces", "a file named `ünï cödé ✓.png` in a folder with a space",
                  odd / "ünï cödé ✓.png"))
    multi = w / "multi.tif"
    frames = [Image.fromarray(hr8[:20, :20]), Image.fromarray(hr8[20:40, :20])]
    frames[0].save(multi, save_all=True, append_images=frames[1:])
    cases.append(("sr: multi-page TIFF", "a two-page TIFF", multi))
    for name, tried, path in cases:
        out = w / f"out_{path.stem}".replace(" ", "_")
        o = run_cli(SR, [*TINY, "--input", str(path), "--output", str(out)])
        pngs = list(out.glob("*.png"))
        note = ""
        if pngs:
            with Image.open(pngs[0]) as im:
                note = f"{im.size[0]}x{im.size[1]} {im.mode}"
        rows.append(_row(name, tried, o, 0, bool(pngs), note or "nothing written"))
        ctx.log(f"images2 {name}: rc {o.rc}")
    return ("## Round 2: images (issue 22, items 4 and 5)\n\nevaluate scores an 8-bit SR image against an HR "
            "written another way; the score must equal (within 0.1 dB) the score against the plain 8-bit upright "
            "HR, computed here with numpy (PSNR on Y, no crop). sr must write every good image and say what it "
            "did with the odd ones.\n\n" + _table(rows))


def _y(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float64)
    return 16.0 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0


def _write_png16_rgb(path: Path, rgb8: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL cannot write one): OpenCV when present, else a PNG written by hand."""
    import struct
    import zlib

    rgb16 = rgb8.astype(">u2") * 257
    h, w = rgb8.shape[:2]
    raw = b"".join(b"\x00" + rgb16[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def section_folders(ctx: Context) -> str:
    """User files in the way of sr, run, evaluate and export."""
    w = ctx.work / "folders2"
    lr = _noise_png(w / "lr" / "x.png", 24, 24)
    rows = []

    def kept(path: Path, before: bytes) -> bool:
        return path.is_file() and path.read_bytes() == before

    hr = w / "hr"
    truth = _noise_png(hr / "x.png", 96, 96, seed=9)
    before = truth.read_bytes()
    o = run_cli(SR, [*TINY, "--input", str(w / "lr"), "--output", str(hr)])
    rows.append(_row("sr into the HR folder", "`--output hr/` where hr/x.png is the ground truth", o, 2,
                     kept(truth, before) and not o.model_loaded, "hr/x.png byte-identical; refused before the model"))
    o = run_cli(SR, [*TINY, "--input", str(w / "lr"), "--output", str(w / "lr")])
    rows.append(_row("sr in place", "`--input lr --output lr`", o, 2, kept(lr, lr.read_bytes())))
    out = w / "mine"
    o1 = run_cli(SR, [*TINY, "--input", str(w / "lr"), "--output", str(out)])
    o = run_cli(SR, [*TINY, "--input", str(w / "lr"), "--output", str(out)])
    rows.append(_row("sr rerun into its own output", "the same command twice", o, 0, o1.rc == 0,
                     "adc replaces what it wrote"))
    (out / "x.png").write_bytes(b"the user edited this file")
    o = run_cli(SR, [*TINY, "--input", str(w / "lr"), "--output", str(out)])
    rows.append(_row("sr over a file adc wrote, then the user changed", "x.png rewritten by the user", o, 2,
                     (out / "x.png").read_bytes() == b"the user edited this file", "the user's edit kept"))
    user = w / "user_folder"
    user.mkdir()
    (user / "report.md").write_text("my notes")
    recipe = w / "s.yaml"
    recipe.write_text(STUDENT_RUN)
    o = run_cli("compress.run", [str(recipe), "--out", str(user)])
    rows.append(_row("run --out a user's folder", "a folder holding the user's report.md", o, 2,
                     (user / "report.md").read_text() == "my notes" and _listing(user) == ["report.md"],
                     "report.md untouched, nothing added"))
    (w / "afile").write_text("x")
    o = run_cli("compress.run", [str(recipe), "--out", str(w / "afile")])
    rows.append(_row("run --out a file", "`--out` names an existing file", o, 2, (w / "afile").read_text() == "x"))
    ev = w / "ev"
    (ev / "report").mkdir(parents=True)
    (ev / "report" / "summary.csv").write_text("mine\n")
    o = run_cli("compress.evaluate", ["--sr", str(hr), "--hr", str(hr), "--metrics", "psnr",
                                      "--out", str(ev / "report")])
    rows.append(_row("evaluate --out over a user's csv", "a folder with the user's summary.csv", o, 2,
                     (ev / "report" / "summary.csv").read_text() == "mine\n"))
    (w / "model.onnx").write_text("the user's own file")
    o = run_cli("compress.export", ["adcsr", "--size", "tiny", "--lr-size", "32", "--out", str(w / "model.onnx")])
    rows.append(_row("export --out over a user's file", "model.onnx that adc did not write", o, 2,
                     (w / "model.onnx").read_text() == "the user's own file"))
    return ("## Round 2: user files in the way (issue 22, item 2)\n\nadc replaces only what it wrote and can "
            "prove it (its `.adc-written` record, with each file's size and time); everything else is refused "
            "with one line, before any model loads.\n\n" + _table(rows))


def section_flags(ctx: Context) -> str:
    """Numbers out of range, on the command line and in recipes."""
    w = ctx.work / "flags2"
    lr = _noise_png(w / "a.png", 24, 24)
    rows = []
    for flags, tried in [(["--threads", "-1"], "--threads -1"), (["--tile", "-5"], "--tile -5"),
                         (["--batch", "0"], "--batch 0"), (["--overlap", "99999999"], "--overlap 99999999"),
                         (["--threads", "nan"], "--threads nan")]:
        o = run_cli(SR, [*TINY, "--input", str(lr), "--output", str(w / "o"), *flags])
        rows.append(_row("sr flag", tried, o, 2, not o.model_loaded))
    o = run_cli("compress.export", ["adcsr", "--size", "tiny", "--opset", "9", "--out", str(w / "m.onnx")])
    rows.append(_row("export flag", "--opset 9 (the exporter writes 14 to 20)", o, 2, not (w / "m.onnx").exists()))
    o = run_cli("compress.export", ["adcsr", "--size", "tiny", "--tolerance", "-1", "--out", str(w / "m.onnx")])
    rows.append(_row("export flag", "--tolerance -1", o, 2))
    recipe = w / "s.yaml"
    recipe.write_text(STUDENT_RUN)
    for override in ("threads=0", "seed=-1", "task.lr_size=100000", "data.eval_limit=0",
                     "stages.remove.unshuffle=64"):
        o = run_cli("compress.run", [str(recipe), "--out", str(w / "run"), "--set", override])
        rows.append(_row("recipe key", f"--set {override}", o, 2, not (w / "run").exists(), "no run folder made"))
    return ("## Round 2: numbers out of range (issue 22, item 6)\n\nEvery numeric flag carries a range "
            "(`compress.config.int_in`/`float_in`) and every numeric recipe key one (`compress.config.ranged`); "
            "tests walk every parser and config so that none is missing.\n\n" + _table(rows))


def section_concurrency(ctx: Context) -> str:
    """Two processes on one folder; a lock a killed process left."""
    w = ctx.work / "concurrency2"
    w.mkdir(parents=True, exist_ok=True)
    recipe = w / "s.yaml"
    recipe.write_text(STUDENT_RUN.replace("  - remove: {init: teacher}", "  - analyse: {}\n  - remove: {init: teacher}"))
    run = w / "run"
    first = subprocess.Popen([sys.executable, "-m", "compress.run", str(recipe), "--out", str(run)], cwd=REPO,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(run.glob(".adc-lock*")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    o = run_cli("compress.run", [str(recipe), "--out", str(run), "--resume"])
    out, err = first.communicate(timeout=600)
    rows = [_row("run: a second process", "`compress.run --resume` on the folder a running run holds", o, 2,
                 first.returncode == 0, f"the first run finished with exit {first.returncode}")]
    # a lock left by a process that no longer exists
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    locks = list(run.glob(".adc-lock*"))
    lock = locks[0] if locks else run / ".adc-lock"
    then = time.time() - 60
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "command": "compress.run",
                                "since_epoch": then, "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(then))}))
    o = run_cli("compress.run", [str(recipe), "--out", str(run), "--resume"])
    rows.append(_row("run: a stale lock", "the lock of a process that has exited", o, 0, "taking over" in o.line,
                     "taken over with a notice"))
    # two sr runs into one folder
    lr = _noise_png(w / "lr" / "big.png", 256, 256)
    sr_out = w / "sr"
    first = subprocess.Popen([sys.executable, "-m", SR, *TINY, "--input", str(lr), "--output", str(sr_out),
                              "--tile", "64"], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while not list(sr_out.glob(".adc-lock*")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    o = run_cli(SR, [*TINY, "--input", str(lr), "--output", str(sr_out)])
    out, err = first.communicate(timeout=600)
    rows.append(_row("sr: a second process", "a second `compress.sr` into the output folder a running one holds",
                     o, 2, first.returncode == 0, f"the first finished with exit {first.returncode}"))
    return ("## Round 2: two processes, one folder (issue 22, item 3)\n\nA run or sr output folder holds a "
            "lock (pid, host, start time) while a command writes into it; a second process gets one line and "
            "exit 2, and the lock of a process that no longer exists is taken over with a notice.\n\n"
            + _table(rows))


ROUND2 = {
    "models2": section_models,
    "images2": section_images,
    "folders2": section_folders,
    "flags2": section_flags,
    "concurrency2": section_concurrency,
}
