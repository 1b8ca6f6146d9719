"""What adc may replace, and who holds a folder: the write record and the folder lock.

Why one module: every command that writes into a folder a user names (sr, run, evaluate, export)
follows one policy, "adc replaces only what it wrote itself and can prove it", and one rule, "one
adc process per folder". :class:`WriteRecord` is the proof, :func:`check_replace` and
:func:`check_own_folder` the checks, :class:`FolderLock` the rule.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import AdcError
from .io import atomic_write_text, file_fingerprint, make_dirs, naming_write_faults, new_file_mode

#: adc's record of the files it wrote in a folder (one JSON object a line), and a folder's lock file.
WRITTEN = ".adc-written"
LOCK = ".adc-lock"


def check_replace(path: str | os.PathLike, record: WriteRecord | None = None,
                  proof: Callable[[Path], bool] | None = None, hint: str = "move it away or choose another folder") -> None:
    """Refuse, with one line naming it, to replace an existing ``path`` that adc cannot prove it wrote.

    Why: adc replaces only what it wrote itself. The proof is ``record`` (the folder's list of
    what adc wrote) or ``proof(path)`` (e.g. an export's own embedded record); a path that does
    not exist (nor as a dangling link) passes.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if record is not None and record.wrote(path):
        return
    if proof is not None and proof(path):
        return
    why = f"{record.path} lists no such file, or it changed since" if record is not None else "no proof adc wrote it"
    raise AdcError(f"refusing to replace {path}: not a file adc wrote ({why}); {hint} (nothing was written)")


class WriteRecord:
    """What adc wrote in ``folder``: ``folder/.adc-written``, one JSON object a line, appended.

    Why: adc replaces only what it wrote itself and can prove it, so a user's ``x.png`` or
    ``report.md`` in a folder adc writes into is never lost. A line names a file adc wrote (path in
    the folder, size and mtime_ns: a file changed or replaced since no longer matches; the last line
    for a path counts) or claims the whole folder (a run folder: everything in it is adc's). A
    torn last line, left by a crash, is ignored.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / WRITTEN
        self.files: dict[str, list[int]] = {}
        self.owner: str | None = None  # the command that claimed the whole folder
        self.lines = 0
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            self.lines += 1
            if isinstance(entry.get("folder"), str):
                self.owner = entry["folder"]
            elif isinstance(entry.get("path"), str) and isinstance(entry.get("fingerprint"), list):
                self.files[entry["path"]] = entry["fingerprint"]

    def _key(self, path: str | os.PathLike) -> str:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(self.folder)).as_posix()

    def wrote(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` (in the folder) is, unchanged, a file adc wrote, or the folder is adc's whole."""
        if self.owner is not None:
            return True
        fp = file_fingerprint(path)
        return fp is not None and self.files.get(self._key(path)) == fp

    def check(self, path: str | os.PathLike, hint: str = "move it away or choose another folder") -> None:
        """:func:`check_replace` with this record as the proof."""
        check_replace(path, self, hint=hint)

    def add(self, path: str | os.PathLike, fingerprint: list[int] | None = None) -> None:
        """Enter ``path`` as written by adc (``fingerprint``: its size and mtime, read now if not given)."""
        key = self._key(path)
        fp = fingerprint or file_fingerprint(path)
        if fp is None:
            return
        self._append({"path": key, "fingerprint": fp})
        self.files[key] = fp

    def claim(self, command: str) -> None:
        """Enter the whole folder as ``command``'s (a run folder); once is enough."""
        if self.owner is None:
            self._append({"folder": command})
            self.owner = command

    def compact(self) -> None:
        """Rewrite the record one line per file once reruns have made it more than twice that long."""
        if self.lines > 2 * (len(self.files) + 1) + 64:
            entries = ([{"folder": self.owner}] if self.owner else []) + \
                      [{"path": k, "fingerprint": v} for k, v in sorted(self.files.items())]
            atomic_write_text(self.path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
            self.lines = len(entries)

    def _append(self, entry: dict[str, Any]) -> None:
        make_dirs(self.folder)
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with naming_write_faults(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, new_file_mode())
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line must not swallow this one
                    line = b"\n" + line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        self.lines += 1


def check_own_folder(folder: str | os.PathLike, what: str, legacy: Sequence[str] = ()) -> None:
    """Refuse a ``folder`` that exists, is not empty and is not adc's (claimed in its :class:`WriteRecord`,
    or holding one of ``legacy``, adc's own files from before the record) as ``what`` (e.g. "run")."""
    folder = Path(folder)
    if not os.path.lexists(folder):
        return
    if not folder.is_dir():
        raise AdcError(f"{folder}: is a file; expected a folder for the {what}")
    if WriteRecord(folder).owner is not None or any((folder / name).is_file() for name in legacy):
        return
    entries = sorted(p.name for p in folder.iterdir() if p.name not in (WRITTEN, LOCK))
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise AdcError(f"{folder}: not empty and not an adc {what} folder (it holds {shown}); choose a new or "
                       "empty folder (nothing was written)")


def _process_alive(pid: int, since: float | None) -> bool:
    """Whether ``pid`` runs on this host and could have taken a lock at time ``since`` (a pid
    reused by a process started later, or a zombie, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # Linux: the state, and the start time to tell a reused pid
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return False
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        started = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return since is None or started <= since + 2  # btime has whole seconds
    except (OSError, ValueError, IndexError, StopIteration):
        return True


class FolderLock:
    """An exclusive lock on a folder adc writes into: ``folder/.adc-lock``, holding pid, host and start.

    Why: two ``compress.run --resume`` on one folder would run the same stages at once. The lock
    is an ``flock`` on the file (dropped by the kernel when its process dies) and the file's
    content (so a holder is named, and a lock whose pid runs on this host refuses even where
    ``flock`` does not reach). A lock file left by a dead process is taken over with one notice;
    a live holder, or one on another host (its pid cannot be checked), is one :class:`AdcError`
    line naming the folder and the pid. :meth:`release` (also on error and Ctrl-C, through
    ``with``) removes the file.
    """

    def __init__(self, folder: str | os.PathLike, command: str, log: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.command = command
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl
        import socket

        make_dirs(self.folder)
        host = socket.gethostname()
        for _ in range(10):  # a holder that removes the file between our open and flock: open again
            with naming_write_faults(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, new_file_mode())
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise self._held(self._read(fd), host, live=True) from None
                except OSError as exc:  # a file system without flock: the content alone decides
                    if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                try:
                    if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                        continue
                except FileNotFoundError:
                    continue
                info = self._read(fd)
                pid = info.get("pid")
                if isinstance(pid, int) and pid != os.getpid():
                    since = info.get("since_epoch")
                    since = since if isinstance(since, (int, float)) else None
                    if info.get("host") != host or _process_alive(pid, since):
                        raise self._held(info, host, live=info.get("host") == host)
                    self.log(f"notice: {self.path}: taking over the lock of pid {pid} (started {info.get('since')}), "
                             "which no longer runs")
                now = time.time()
                text = json.dumps({"pid": os.getpid(), "host": host, "command": self.command, "since_epoch": now,
                                   "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))}) + "\n"
                with naming_write_faults(self.path):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, text.encode(), 0)
                    os.fsync(fd)
                self.fd, fd = fd, None
                return self
            finally:
                if fd is not None:
                    os.close(fd)
        raise AdcError(f"{self.folder}: could not take its lock {self.path} (it kept changing); try again")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)  # before the flock goes, so the next holder opens a fresh file
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (ValueError, OSError):
            return {}
        return info if isinstance(info, dict) else {}

    def _held(self, info: dict[str, Any], host: str, live: bool) -> AdcError:
        where = f" on host {info['host']}" if info.get("host") not in (None, host) else ""
        tail = ("wait for it to end" if live else
                f"its pid cannot be checked from here; if that process is gone, delete {self.path}")
        return AdcError(f"{self.folder}: in use by {info.get('command') or 'another adc process'} (pid "
                        f"{info.get('pid', 'unknown')}{where}, since {info.get('since', '?')}); {tail}")
