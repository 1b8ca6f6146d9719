"""``compress.io``: atomic + durable writes, one-line write faults, byte-identical artifacts."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from compress.io import (WriteError, atomic_dir, atomic_path, atomic_torch_save, atomic_write_text, load_safetensors,
                         make_dirs, safe_torch_load, save_safetensors)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_torch_archives_are_byte_identical_and_named_archive(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    a, b = atomic_torch_save(state, tmp_path / "a.pkl"), atomic_torch_save(state, tmp_path / "sub" / "b.ckpt")
    assert a.read_bytes() == b.read_bytes()  # the temp file's random name is not inside the archive
    assert {n.split("/")[0] for n in zipfile.ZipFile(a).namelist()} == {"archive"}
    assert torch.equal(safe_torch_load(b)["w"], state["w"])


def test_safetensors_header_is_sorted_and_files_are_0644(tmp_path, umask_022):
    meta = {f"key{i}": f"value {i} é\n" for i in range(8)}
    state = {"z": torch.zeros(3), "a": torch.ones(2, 2)}
    one = save_safetensors(state, tmp_path / "one.safetensors", metadata=meta)
    two = save_safetensors(dict(reversed(list(state.items()))), tmp_path / "two.safetensors",
                           metadata=dict(reversed(list(meta.items()))))
    assert one.read_bytes() == two.read_bytes()
    raw = one.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert list(header["__metadata__"]) == sorted(meta) and list(header) == sorted(header)
    assert oct(one.stat().st_mode & 0o777) == oct(0o644)  # the writer replaces the temp file: chmod after it
    loaded = load_safetensors(one)
    assert torch.equal(loaded["a"], state["a"]) and torch.equal(loaded["z"], state["z"])
    from safetensors import safe_open

    with safe_open(str(one), "pt") as fh:
        assert fh.metadata() == meta


def test_atomic_path_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(tmp_path / "new" / "f.txt", "hello")
    assert events[-3:] == ["fsync file", "rename", "fsync dir"]
    assert "fsync dir" in events[:-3]  # the new folder's entry in tmp_path too
    assert (tmp_path / "new" / "f.txt").read_text() == "hello"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_write_fault_is_one_line_and_leaves_the_old_file(tmp_path, code):
    target = tmp_path / "model.safetensors"
    target.write_text("the previous good file")
    with pytest.raises(WriteError) as info:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(code, os.strerror(code))
    msg = str(info.value)
    assert msg.startswith(f"{target}: cannot write ({os.strerror(code)})") and "\n" not in msg
    assert target.read_text() == "the previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp file left


@pytest.mark.parametrize("text", [
    "Error while serializing: I/O error: No space left on device (os error 28)",  # safetensors 0.8
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
])
def test_safetensors_disk_full_message_is_translated(tmp_path, monkeypatch, text):
    import compress.io as io_mod

    class SafetensorError(Exception):
        pass

    def full(*args, **kwargs):
        raise SafetensorError(text)

    monkeypatch.setattr(io_mod, "save_file", full)
    with pytest.raises(WriteError, match="No space left on device"):
        save_safetensors({"a": torch.ones(1)}, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_and_interrupts_propagate_and_clean_up(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "x") as tmp:
            tmp.write_text("partial")
            raise ValueError("a bug, not a write fault")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "x") as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_folder_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match="file"):
        make_dirs(tmp_path / "file" / "sub")
    with pytest.raises(WriteError, match="a file of that name exists"):
        make_dirs(tmp_path / "file")


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_real_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    """On a 1 MiB tmpfs (needs root; skipped otherwise): the real ENOSPC path, not a simulated one."""
    mnt = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        save_safetensors({"a": torch.ones(10)}, mnt / "w.safetensors")
        good = (mnt / "w.safetensors").read_bytes()
        with pytest.raises(WriteError, match="No space left on device"):
            save_safetensors({"a": torch.ones(1_000_000)}, mnt / "w.safetensors")  # 4 MB into 1 MiB
        with pytest.raises(WriteError, match="No space left on device"):
            atomic_torch_save({"a": torch.ones(1_000_000)}, mnt / "w.pkl")
        assert (mnt / "w.safetensors").read_bytes() == good
        assert sorted(p.name for p in mnt.iterdir()) == ["w.safetensors"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path, umask_022):
    target = tmp_path / "student"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(WriteError, match="No space left"):
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"] and (target / "old.txt").read_text() == "old"
    with atomic_dir(target) as tmp:
        atomic_write_text(tmp / "record.json", "{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temp or .old folder left
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["record.json", "sub", "sub/w.bin"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)  # mkdtemp's 0700 is not kept
