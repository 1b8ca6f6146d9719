"""Safe loading and atomic, durable, reproducible saving of weights and files.

Why: pickled checkpoints can run arbitrary code, and a crash in the middle of a write must
never leave a half-written file where a good one was. Every write goes to a temp file beside
the target, is fsynced, renamed onto the target, and the folder is fsynced: after kill -9 *or*
a power loss the target is either the old file or the complete new one. A write that fails
(disk full, quota, read-only file system, no permission) raises :class:`WriteError`, one line
naming the target, and leaves nothing behind. Identical content gives identical bytes: torch
archives do not carry the temp file's name, and safetensors headers are written with sorted keys.
What adc may replace in a folder the user names, and the folder lock: :mod:`compress.ownership`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import stat
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import AdcError

if TYPE_CHECKING:
    from .ownership import WriteRecord


def refused_pickle(path: str | os.PathLike, exc: BaseException, what: str = "the pickle") -> AdcError:
    """One line for a weights-only load that failed (torch's message is a page of advice): the global
    it would have called, or what else the safe unpickler could not read."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"unsupported (?:global:? )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if found:
        return AdcError(f"{path}: refused to load, {what} needs arbitrary code "
                        f"(weights_only=True refused {found.group(1)})")
    advice = ("Weights only load failed", "(1)", "(2)", "Check the documentation", "Please file an issue", "Re-running")
    detail = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(advice)),
                  type(exc).__name__)
    detail = detail.removeprefix("WeightsUnpickler error:").strip() or type(exc).__name__
    return AdcError(f"{path}: refused to load, the safe (weights_only=True) unpickler cannot read {what} "
                    f"({detail[:100]})")


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a file that needs arbitrary code is refused."""
    path = Path(path)
    if not path.is_file():
        raise AdcError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refused_pickle(path, exc) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise AdcError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside the block runs with ``weights_only=True``, whatever its caller asked.

    Why: ``torch.export.load`` unpickles parts of a ``.pt2`` archive with ``weights_only=False``
    (legacy weights and constants, payloads marked ``use_pickle``, and a fallback when the safe load
    fails), so a crafted archive runs code on load. torch's own switch,
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, closes every such path at once; the opposite switch is
    lifted for the block, since torch refuses the two together.
    """
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class WriteError(AdcError):
    """A file could not be written: disk full, quota, read-only file system, no permission, ..."""


#: errno -> what to tell the user; other OSErrors are not write faults and propagate unchanged.
_WRITE_FAULTS = {
    errno.ENOSPC: "no space left on the device; free some space or choose another folder",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another folder",
    errno.EROFS: "read-only file system; choose another folder",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "operation not permitted; choose a folder you can write to",
    errno.EFBIG: "file too large for this file system",
    errno.ENOTDIR: "a parent of it is a file, not a folder",
    errno.EIO: "I/O error on the device",
}


def write_fault(exc: BaseException, path: str | os.PathLike) -> WriteError | None:
    """A one-line :class:`WriteError` for ``exc`` if it is a write fault on ``path`` (else None).

    Also reads the errno out of safetensors' own error text (``... (os error 28)``, ``Os { code: 28, ...``).
    """
    code = None
    for _ in range(4):  # torch.save's clean-up raises a RuntimeError over the OSError: follow the chain
        if exc is None or code in _WRITE_FAULTS:
            break
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None:
            m = re.search(r"(?:\(os error |Os \{ code: )(\d+)", str(exc))
            code = int(m.group(1)) if m else None
        exc = exc.__cause__ or exc.__context__
    if code not in _WRITE_FAULTS:
        return None
    return WriteError(f"{path}: cannot write ({os.strerror(code)}): {_WRITE_FAULTS[code]}; nothing was written there")


@contextlib.contextmanager
def naming_write_faults(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a write fault from the block (:func:`write_fault`) as one :class:`WriteError` line naming ``path``."""
    try:
        yield
    except Exception as exc:
        fault = write_fault(exc, path)
        if fault is None:
            raise
        raise fault from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask, 0o644 usually); mkstemp gives 0o600."""
    return 0o666 & ~_umask()


def _dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder (0o755 usually); mkdtemp gives 0o700."""
    return 0o777 & ~_umask()


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """fsync a file, or a folder (so a rename or a new entry in it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a folder; the data itself was synced
        if not directory or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def make_dirs(folder: str | os.PathLike) -> Path:
    """``mkdir -p`` whose new entries are fsynced; a write fault is one :class:`WriteError` line."""
    folder = Path(folder)
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for d in reversed(missing):
            fsync_path(d.parent, directory=True)
    except FileExistsError:
        raise WriteError(f"{folder}: cannot create the folder, a file of that name exists") from None
    except OSError as exc:
        raise write_fault(exc, folder) or exc from None
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, record: WriteRecord | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is made durable and renamed onto ``path``.

    Order: the writer fills the temp file; it gets the normal file mode (after the writer, which
    may have replaced it) and is fsynced; it is renamed; the folder is fsynced. On any error or
    interrupt the temp file is removed; a write fault (disk full, read-only, ...) in the block
    becomes one :class:`WriteError` line naming ``path``. With ``record``, an existing ``path``
    that the record does not prove adc's is refused (before the writer runs and again just before
    the rename), and the new file is entered in the record before the rename: a crash between
    the two leaves a record that matches no file, which refuses, never a file that it wrongly allows.
    """
    path = Path(path)
    if record is not None:
        record.check(path)
    make_dirs(path.parent)
    with naming_write_faults(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with naming_write_faults(path):
            yield tmp_path
            os.chmod(tmp_path, new_file_mode())
            fsync_path(tmp_path)
            if record is not None:
                record.check(path)
                record.add(path, fingerprint=file_fingerprint(tmp_path))  # size and mtime survive the rename
            os.replace(tmp_path, path)
            fsync_path(path.parent, directory=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; on success it replaces ``path`` as a whole.

    Its files and the folder are fsynced, then it takes ``path``'s place: an existing ``path`` is
    swapped with it in one ``renameat2(RENAME_EXCHANGE)`` (Linux), so a crash leaves the old or
    the new folder, never neither; where that call is missing, the old folder is first renamed
    to a hidden ``.NAME.old.<pid>`` (a crash between the two renames leaves both hidden folders
    and no ``path``). On any error or interrupt the temp folder is removed; write faults become
    one :class:`WriteError` line naming ``path``.
    """
    path = Path(path)
    make_dirs(path.parent)
    if path.exists() and not path.is_dir():
        raise AdcError(f"{path}: exists and is not a folder")
    with naming_write_faults(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with naming_write_faults(path):
            yield tmp
            _swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` and its files, then put it at ``path`` (see :func:`atomic_dir`)."""
    for f in tmp.rglob("*"):
        if f.is_file():
            os.chmod(f, new_file_mode())
            fsync_path(f)
    os.chmod(tmp, _dir_mode())
    fsync_path(tmp, directory=True)
    if path.exists() and _exchange(tmp, path):
        fsync_path(path.parent, directory=True)
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old folder
    else:
        old = path.with_name(f".{path.name}.old.{os.getpid()}") if path.exists() else None
        if old is not None:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:
                os.replace(old, path)
            raise
        fsync_path(path.parent, directory=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically. Saved through a file object: given a path, torch names the
    archive's records after the (random) temp file, so identical runs would differ in bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Save a state dict atomically; tensors are made contiguous and de-aliased first."""
    clean = {k: v.detach().contiguous().clone() if _shares_storage(v, state) else v.detach().contiguous()
             for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
        sort_safetensors_header(tmp)
    return Path(path)


def sort_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header in place with sorted keys (``__metadata__`` included).

    Why: the safetensors writer keeps metadata in a hash map, so its key order (and so the
    file's bytes) changes from run to run. Same keys and values, so the sorted JSON has the same
    length and the tensor data does not move; the header is padded with spaces as the format allows.
    """
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        if isinstance(header.get("__metadata__"), dict):
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # never seen (same content, same escapes); keep the writer's valid file
            return
        fh.seek(8)
        fh.write(text + b" " * (n - len(text)))


def _shares_storage(t: torch.Tensor, state: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else None
    if ptr is None:
        return False
    return sum(1 for v in state.values() if v.device.type != "meta" and v.untyped_storage().data_ptr() == ptr) > 1


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise AdcError(f"{path}: file not found")
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises its own error types
        raise AdcError(f"{path}: not a readable safetensors file ({str(exc)[:160]})") from None


def read_format_json(path: str | os.PathLike, fmt: str, what: str) -> dict[str, Any]:
    """Read a JSON metadata file that must be a mapping with ``"format": fmt``; one-line errors otherwise.

    ``what`` names the writer, for the message when the file is missing (e.g. "save_compressed").
    """
    path = Path(path)
    if not path.is_file():
        raise AdcError(f"{path.parent}: no {path.name}; not a directory written by {what}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdcError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise AdcError(f"{path}: format is {found!r}, expected {fmt!r}")
    return meta


def file_fingerprint(path: str | os.PathLike) -> list[int] | None:
    """[size, mtime_ns] of a regular file (a link is not followed), else None: what shows it unchanged."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None
