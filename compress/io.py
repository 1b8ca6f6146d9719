"""Safe loading and atomic saving of weights and files.

Why: pickled checkpoints can run arbitrary code, and a crash in the middle of a write must
never leave a half-written file where a good one was.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import AdcError


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a file that needs arbitrary code is refused."""
    path = Path(path)
    if not path.is_file():
        raise AdcError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdcError(
            f"{path}: refused to load, the pickle needs arbitrary code "
            f"(weights_only=True failed: {first[:160]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise AdcError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it is renamed onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Save a state dict atomically; tensors are made contiguous and de-aliased first."""
    clean = {k: v.detach().contiguous().clone() if _shares_storage(v, state) else v.detach().contiguous()
             for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
    return Path(path)


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
