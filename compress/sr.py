"""``python -m compress.sr``: super-resolve an image or a folder with any adc SR model.

Why a separate entry point: the official AdcSR ``test.py`` needs sides divisible by 16, runs the
whole image at once (a 1500x1200 LR runs out of memory on an H100, AdcSR issue #7) and has no
safe half precision. Here the LR is reflection-padded and the output cropped back, large
images are tiled with seam-free blending and *global* colour statistics, and fp16/bf16 run as
autocast with a non-finite fallback (see :mod:`compress.inference`). Each PNG is written row
band by row band as tiles finish, so memory is bounded by the tile, not the image.

Files: the output folder is created and test-written before the model is loaded. Inputs are
never overwritten, and neither is any other file in an input's own folder: ``--input dir/x.jpg
--output dir`` writes ``dir/x.png`` only if no such file exists. In a separate output folder,
a rerun replaces the outputs of the same names that it wrote itself (listed, with their size and
mtime, in the folder's ``.adc-written``); any other existing file is refused before the model
loads, so ``--output`` pointed at an HR folder loses nothing. One run at a time writes into a
folder (``.adc-lock``). Every PNG is written atomically; a failed
write (disk full, read-only, ...) stops the run with one ``error:`` line naming the file
(exit 2), leaving the images already written and no partial file. Ctrl-C: "interrupted", exit 130.
An image that cannot be read, or has NaN/inf pixels, or gets a non-finite output even in fp32,
is one ``skipped:`` line and the run goes on (exit 1 only when nothing was written). An image
with alpha gives an RGBA PNG: the model upscales the RGB, the alpha is upscaled bicubically.

    python -m compress.sr --model weights/ --input lr/ --output sr/ --tile 512 --dtype fp16

``--model``: a folder with the official ``net_params_*.pkl`` + ``halfDecoder.ckpt``; an adc
run folder (with ``student/``); a model name of the family registry (a family's teacher, or a
compressed model such as ``adcsr``) with random weights; or a file written by ``python -m
compress.export`` (``.onnx``: onnxruntime, ``.pt2``: torch.export). ``--backend onnxruntime``
with any other model exports it first (dynamic sizes, colour fix outside the graph) into a
temporary folder; padding, tiling and the global colour fix are the same for every backend.
An exported file follows its record's ``color_fix``: ``inside`` (the export default) runs as it
is, with no second fix (per tile under ``--tile``, which a warning says); ``outside`` gets the
global fix here. ``--dtype fp16`` keeps the blocks whose fp32 activations leave fp16's range in fp32
(``--fp16-policy``, measured on the first image by default; see :mod:`compress.inference.fp16`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import AdcError
from .config import int_in

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["load_sr_model", "upscale", "upscale_to_png", "plan_outputs", "prepare_output_folder", "sr_models", "main"]


def __getattr__(name: str) -> Any:
    """``upscale``/``upscale_to_png`` re-exported on first use: ``--help`` need not import torch (PEP 562)."""
    if name in ("upscale", "upscale_to_png"):
        from . import inference

        return getattr(inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sr_models() -> list[str]:
    """Names ``--model`` accepts for random-weight test runs: every family's teacher and named models."""
    from .families import models

    return sorted(n for n, (_, kind) in models().items() if kind in ("teacher", "student"))

EXPORTED_SUFFIXES = (".onnx", ".pt2")
BACKENDS = ("torch", "onnxruntime")
DEFAULT_OVERLAP = 32  # LR px shared by neighbouring tiles
HALF_DECODER = "halfDecoder.ckpt"
_NET_PARAMS = re.compile(r"^net_params_(\d+)\.pkl$")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- model loading


def _parse_device(device: str | torch.device | None) -> torch.device:
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AdcError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AdcError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU")
    return dev


def _official_files(folder: Path) -> tuple[Path | None, Path | None]:
    """(highest-epoch net_params_*.pkl, halfDecoder.ckpt), each None when absent."""
    epochs = [(int(m.group(1)), p) for p in folder.glob("net_params_*.pkl") if (m := _NET_PARAMS.match(p.name))]
    net = max(epochs)[1] if epochs else None
    dec = folder / HALF_DECODER
    return net, dec if dec.is_file() else None


def _load_official_dir(folder: Path, size: str, device: torch.device, log: Callable[[str], None]) -> nn.Module:
    from .zoo.adcsr import build_adcsr, load_official

    net, dec = _official_files(folder)
    if net is None or dec is None:
        missing = "net_params_<epoch>.pkl" if net is None else HALF_DECODER
        raise AdcError(f"{folder}: official AdcSR weights need net_params_<epoch>.pkl and {HALF_DECODER}; "
                       f"{missing} is missing")
    model = build_adcsr(size, "meta")  # no random init of 456 M parameters just to overwrite them
    try:
        load_official(model, net, dec)
    except AdcError as exc:
        other = "tiny" if size == "full" else "full"
        raise AdcError(f"{exc} (is --size {size} right? try --size {other})") from None
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = build_adcsr(size, "cpu")
        load_official(model, net, dec)
    log(f"loaded official AdcSR ({size}): {net.name} + {HALF_DECODER} from {folder}")
    return model.to(device).eval()


def _load_student_dir(student: Path, device: torch.device, log: Callable[[str], None]) -> nn.Module:
    """A student written by the adc runner (:func:`compress.student.save_student`)."""
    from .io import read_format_json
    from .student import STUDENT_FILE, load_student

    if read_format_json(student / STUDENT_FILE, "adc-student", "adc's save_student").get("weights") is False:
        raise AdcError(f"{student}: the run stored the student's structure only (device: meta), no weights to "
                       f"run; rerun its recipe with device: cpu or cuda")
    model, _ = load_student(student)
    log(f"loaded compressed student from {student}")
    return model.to(device).eval()


def load_sr_model(spec: str | os.PathLike, size: str = "full", device: str | torch.device | None = "cpu",
                  log: Callable[[str], None] | None = None) -> nn.Module:
    """The SR model named by ``spec``, in eval mode on ``device``.

    ``spec``: a folder with official AdcSR weights (``size`` must match them: "full" for the
    released ones), an adc run folder with ``student/`` (or that ``student/`` folder), or a model name of
    :func:`sr_models` (random weights, with a one-line warning through ``log``), or an exported
    ``.onnx``/``.pt2`` file (:func:`compress.deploy.load_exported`).
    """
    log = log or _stderr
    dev = _parse_device(device)
    if size not in ("full", "tiny"):
        raise AdcError(f"--size {size!r} is not one of full, tiny")
    path = Path(spec)
    if path.suffix in EXPORTED_SUFFIXES and path.is_file():
        from .deploy.runtime import load_exported

        model = load_exported(path, dev)
        rec = model.record
        log(f"loaded exported {path.suffix[1:]} {path} ({rec.get('source', '?')}; "
            f"{'dynamic' if rec.get('dynamic') else 'static %dx%d' % tuple(rec.get('lr_size', (0, 0)))}, "
            f"colour fix {rec.get('color_fix')})")
        return model
    if path.is_dir():
        from .student import find_student

        student = find_student(path)  # a run folder, or its student/ folder
        if student is not None:
            return _load_student_dir(student, dev, log)
        net, dec = _official_files(path)
        if net is not None or dec is not None:
            return _load_official_dir(path, size, dev, log)
        raise AdcError(f"--model {spec}: folder has neither official AdcSR weights (net_params_*.pkl + "
                       f"{HALF_DECODER}) nor a run's student/")
    if str(spec) in sr_models():
        from .families import build

        model = build(str(spec), size, dev)
        log(f"warning: --model {spec}: random weights (no checkpoint given); outputs are only good for testing")
        return model.eval()
    what = "is a file" if path.exists() else "does not exist"
    raise AdcError(f"--model {spec!r}: {what}; expected a folder with net_params_*.pkl + {HALF_DECODER}, "
                   f"a run folder with student/, or one of {', '.join(sr_models())}")


# ----------------------------------------------------------------------------- files


def _inputs(src: Path, out_dir: Path, recursive: bool) -> tuple[Path, list[Path]]:
    """(root the outputs mirror, image files to read); refuses an output folder equal to the input one."""
    from .data.images import IMAGE_EXTENSIONS, list_images

    if src.is_file():
        return src.parent, [src]
    if not src.is_dir():
        raise AdcError(f"--input {src}: no such file or folder")
    if out_dir.resolve() == src.resolve():
        raise AdcError(f"--output {out_dir} is the input folder; choose another one (inputs are never overwritten)")
    out_real = out_dir.resolve()
    files = list_images(src, recursive=recursive)
    if out_real.is_relative_to(src.resolve()):  # an output folder inside the input tree: skip earlier outputs
        files = [p for p in files if not p.resolve().is_relative_to(out_real)]  # (not when it is a parent)
    if not files:
        raise AdcError(f"--input {src}: no images ({', '.join(IMAGE_EXTENSIONS)})"
                       f"{'' if recursive else ' (add --recursive for subfolders)'}")
    return src, files


def plan_outputs(root: Path, files: Sequence[Path], out_dir: Path) -> list[Path]:
    """One PNG per input, mirroring its path under ``root``; refuses any that would overwrite an input,
    or any existing file in an input's own folder (``--input dir/x.jpg --output dir`` with a ``dir/x.png``).

    Elsewhere an existing file is replaced only if adc wrote it there, unchanged since (the folder's
    :class:`~compress.ownership.WriteRecord`): a user's own ``x.png`` (say, the HR ground truth) is refused.
    Two inputs with the same stem (``a.jpg``, ``a.png``) get ``a.png`` and ``a.jpg.png``.
    """
    from .ownership import WriteRecord

    record = WriteRecord(out_dir)
    sources = {p.resolve() for p in files}
    inodes = {(s.st_dev, s.st_ino) for s in (p.stat() for p in files)}
    input_dirs = {p.parent for p in sources}
    taken: set[Path] = set()
    plan = []
    for p in files:
        rel = p.relative_to(root)
        out = out_dir / rel.with_suffix(".png")
        if out.resolve() in taken:
            out = out_dir / rel.with_name(rel.name + ".png")
        real = out.resolve()
        if real in sources or (out.exists() and (out.stat().st_dev, out.stat().st_ino) in inodes):
            raise AdcError(f"refusing to write {out}: it is an input file (choose another --output)")
        if real.parent in input_dirs and out.exists():
            raise AdcError(f"refusing to write {out}: the file exists in the input's folder and adc never "
                           f"overwrites files there (choose another --output)")
        record.check(out, hint="move it away or choose another --output")
        taken.add(real)
        plan.append(out)
    return plan


def prepare_output_folder(out_dir: Path) -> bool:
    """Create ``out_dir`` if needed and prove it writable (a probe file written and removed), before
    any model is loaded; one line otherwise. Returns whether the folder was created."""
    from .io import make_dirs, write_fault

    if out_dir.exists() and not out_dir.is_dir():
        raise AdcError(f"--output {out_dir}: is a file; expected a folder for the PNGs")
    created = not out_dir.exists()
    make_dirs(out_dir)
    try:
        fd, probe = tempfile.mkstemp(prefix=".adc-write-probe-", dir=out_dir)
        try:
            os.write(fd, b"adc")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        fault = write_fault(exc, out_dir)
        raise AdcError(f"--output {fault or f'{out_dir}: cannot write ({exc.strerror or exc})'}") from None
    return created


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in msg or "not enough memory" in msg)


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    from .cli import prog

    p = argparse.ArgumentParser(prog=prog("sr"),
                                description="Super-resolve an image or a folder of images with an adc SR model "
                                            "(reflection padding, optional tiling with global colour statistics).")
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="official AdcSR weights folder, adc run folder, an exported .onnx/.pt2 file (adc export), or a "
                        "model name (random weights, for tests)")
    p.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    p.add_argument("--output", required=True, type=Path,
                   help="folder for the PNGs: never the input folder; an existing file there is replaced only if "
                        "an earlier sr run wrote it (none in an input's folder)")
    p.add_argument("--recursive", action="store_true", help="also read images in subfolders (mirrored in --output)")
    p.add_argument("--tile", type=int_in(0, 65536), default=None, metavar="N",
                   help="LR tile side in px (a multiple of the model's 16); 0 or unset = whole image at once")
    p.add_argument("--overlap", type=int_in(0, 65536), default=None, metavar="M",
                   help=f"LR px shared by neighbouring tiles ({DEFAULT_OVERLAP}; unset, at most the tile less 16)")
    p.add_argument("--batch", type=int_in(1, 4096), default=None,
                   help="tiles per forward pass (default: 4 on a GPU, 1 on a CPU, where batching buys little and "
                        "costs memory)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="fp32, or bf16/fp16 autocast (norms and softmax stay fp32; fp16 on CPU runs as bf16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--size", default="full", choices=("full", "tiny"),
                   help="model widths: full (the released weights) or tiny (tests and demos)")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="torch (default) or onnxruntime (an .onnx --model, or any other model exported first; "
                        "pip install -e '.[deploy]')")
    p.add_argument("--threads", type=int_in(0, 1024), default=0,
                   help="CPU threads for torch and onnxruntime (0: torch's default)")
    p.add_argument("--fp16-policy", default="auto", metavar="auto|off|FILE",
                   help="with fp16: which blocks stay fp32. auto (default): those whose fp32 activations on the "
                        "first image exceed 65504/4; FILE: a policy from python -m compress.deploy.fp16; off: none")
    return p


def _load_backend(args: argparse.Namespace, device: torch.device, stack: contextlib.ExitStack,
                  log: Callable[[str], None]) -> nn.Module:
    """The model for ``--backend``: an exported file as it is, or a model exported to ONNX on the fly."""
    spec = Path(args.model)
    exported = spec.suffix in EXPORTED_SUFFIXES and spec.is_file()
    backend = args.backend or ("onnxruntime" if exported and spec.suffix == ".onnx" else "torch")
    if exported and (backend == "onnxruntime") != (spec.suffix == ".onnx"):
        want = "onnxruntime" if spec.suffix == ".onnx" else "torch"
        raise AdcError(f"--model {spec}: a {spec.suffix} file runs with --backend {want}, not {backend}")
    if backend == "torch" or exported:
        return load_sr_model(args.model, args.size, device, log=log)
    from .deploy.export import export_model
    from .deploy.runtime import load_exported
    from .inference import model_pad_multiple

    model = load_sr_model(args.model, args.size, "cpu", log=log)
    if getattr(model, "color_fix", None) is None:
        raise AdcError(f"--backend onnxruntime: {type(model).__name__} is not exportable here; "
                       "export it with python -m compress.export and pass the .onnx file")
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adc-sr-onnx-")))
    t0 = time.perf_counter()
    log("exporting the model to ONNX for onnxruntime (dynamic sizes, colour fix outside the graph; once per run)")
    export_model(model, folder / "model.onnx", "onnx", model_pad_multiple(model) * 2, dynamic=True,
                 color_fix="outside" if model.color_fix else "none", source=str(args.model), check=False)
    del model
    log(f"exported in {time.perf_counter() - t0:.0f} s")
    return load_exported(folder / "model.onnx", device, args.threads or None)


def _fp16_blocks(args: argparse.Namespace, model: nn.Module, first: torch.Tensor | None,
                 log: Callable[[str], None]) -> list[str] | None:
    """The blocks kept in fp32 under fp16: from ``--fp16-policy`` FILE, or measured on ``first`` (LR in [0, 1])."""
    from .inference import color_fix_off, model_device, model_pad_multiple
    from .inference.fp16 import calibrate, load_policy
    from .inference.padding import reflect_pad_to_multiple

    if args.fp16_policy == "off":
        return None
    if args.fp16_policy != "auto":
        policy = load_policy(args.fp16_policy)
        log(f"fp16: {len(policy.keep_fp32)} blocks stay fp32 (policy {args.fp16_policy})")
        return policy.keep_fp32
    if first is None:
        return None
    crop = first[:, :256, :256]  # a calibration crop: enough context, one fp32 pass
    x, _ = reflect_pad_to_multiple(crop[None].float() * 2 - 1, model_pad_multiple(model))
    with color_fix_off(model):
        policy, _ = calibrate(model, [x.to(model_device(model))])
    log(f"fp16: {len(policy.keep_fp32)} blocks stay fp32 (their fp32 activations on the first image exceed "
        f"{policy.limit:.0f}; --fp16-policy off to disable)")
    return policy.keep_fp32


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    t0 = time.perf_counter()
    if args.tile is not None and args.tile < 0:
        raise AdcError(f"--tile {args.tile}: expected a positive number of px (or 0 for no tiling)")
    if args.batch is not None and args.batch < 1:
        raise AdcError(f"--batch {args.batch}: expected >= 1")
    if args.overlap is not None and args.tile and args.overlap >= args.tile:
        raise AdcError(f"--overlap {args.overlap}: expected smaller than --tile {args.tile}")
    if args.threads < 0:
        raise AdcError(f"--threads {args.threads}: expected >= 0 (0: torch's default)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    root, files = _inputs(args.input, args.output, args.recursive)
    outputs = plan_outputs(root, files, args.output)
    device = _parse_device(args.device)
    created = prepare_output_folder(args.output)  # before minutes of model loading, not after
    try:
        with contextlib.ExitStack() as stack:  # the on-the-fly ONNX export's folder lives until the end
            from .ownership import FolderLock

            stack.enter_context(FolderLock(args.output, "compress.sr", log))  # one sr run per output folder
            model = _load_backend(args, device, stack, log)
            return _run_files(args, model, files, outputs, log, t0)
    finally:
        if created:
            with contextlib.suppress(OSError):
                args.output.rmdir()  # only if still empty: a run that wrote nothing leaves no trace


def _run_files(args: argparse.Namespace, model: nn.Module, files: Sequence[Path], outputs: Sequence[Path],
               log: Callable[[str], None], t0: float) -> int:
    import torch
    from tqdm import tqdm

    from . import inference
    from .data.images import ImageReadError, decode_image, to_chw_tensor
    from .deploy.runtime import ExportedSR
    from .inference import Precision, model_device, model_pad_multiple, resolve_precision
    from .inference.engine import NonFiniteImage
    from .io import WriteError
    from .ownership import WriteRecord

    record = WriteRecord(args.output)  # each PNG is entered as it is written: a rerun may replace it
    record.compact()
    tile = args.tile or None
    batch = args.batch or (4 if model_device(model).type == "cuda" else 1)
    exported = isinstance(model, ExportedSR)
    if exported and args.dtype != "fp32":
        raise AdcError(f"--dtype {args.dtype}: an exported graph runs in the precision it was exported in (fp32); "
                       "use --backend torch for bf16/fp16")
    precision: Precision = resolve_precision(args.dtype, model_device(model))
    if precision.notice:
        log(precision.notice)
    policy_needed = precision.name == "fp16" and not exported
    blocks: list[str] | None = None
    overlap = DEFAULT_OVERLAP if args.overlap is None else args.overlap
    if tile is not None:  # rounded here once, not once per image inside upscale
        multiple = model_pad_multiple(model)
        rounded = max(multiple, tile // multiple * multiple)
        if rounded != tile:
            log(f"notice: --tile {tile} rounded to {rounded} (a multiple of {multiple})")
        tile = rounded
        if args.overlap is None:  # the default shrinks with a small tile instead of refusing it
            overlap = min(DEFAULT_OVERLAP, tile - multiple)
        elif args.overlap > tile - multiple:
            raise AdcError(f"--overlap {args.overlap}: expected at most {tile - multiple} (the tile, {tile} after "
                           f"rounding --tile {args.tile} to a multiple of {multiple}, less one multiple)")
        if exported and model.fix_in_graph:  # the record says the graph colour-matches each call itself
            log(f"warning: {args.model} has the colour fix inside the graph: with --tile it is applied per tile, "
                "not once over the image (export with --color-fix outside for one global fix)")

    written = skipped = 0
    for src, dst in zip(tqdm(files, desc="sr", unit="img", file=sys.stderr, disable=None), outputs):
        try:
            img = decode_image(src)
        except ImageReadError as exc:
            log(f"skipped: {exc}")
            skipped += 1
            continue
        lr = to_chw_tensor(img.rgb)
        alpha = None if img.alpha is None else torch.from_numpy(img.alpha)  # kept: upscaled bicubically, RGBA PNG
        del img
        h, w = lr.shape[-2:]
        if tile is None and max(h, w) > 1024:
            log(f"hint: {src.name} is {w}x{h} and runs untiled; add --tile 512 if memory runs out")
        if policy_needed:
            blocks, policy_needed = _fp16_blocks(args, model, lr, log), False
        try:
            inference.upscale_to_png(model, lr, dst, tile=tile, overlap=overlap, dtype=precision, batch=batch,
                           progress=True, log=log, name=str(src), fp32_blocks=blocks, alpha=alpha, record=record)
        except NonFiniteImage as exc:  # this image only (the PNG is written atomically: nothing left of it)
            log(f"skipped: {exc}")
            skipped += 1
            continue
        except WriteError as exc:
            raise WriteError(f"{exc}; {written} of {len(files)} images were written before it") from None
        except (RuntimeError, MemoryError) as exc:
            if not _is_oom(exc):
                raise
            advice = "a smaller --tile or --batch 1" if tile else "--tile 512 (or smaller)"
            raise AdcError(f"{src}: out of memory on a {w}x{h} image; rerun with {advice}") from None
        del lr
        written += 1
    print(f"done: {written} written, {skipped} skipped, {time.perf_counter() - t0:.1f} s -> {args.output}",
          flush=True)
    return 1 if written == 0 and skipped else 0


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_cli

    args = _parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
