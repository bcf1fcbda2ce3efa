"""One writer per directory: `DIR/.lock`, created exclusively (O_EXCL), names its holder.

A lock left by a process that no longer runs on this host (a killed build) is taken over; a live
holder, or one on another host (which cannot be checked), makes the second writer refuse in one
line. Used by `vla-ds cache` (the cache directory) and `vla-ds preprocess` (the dataset directory),
which also relies on it to know that temporary folders it finds are stale, not being written.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from vla_ds.errors import UsageError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but not yet reaped child still answers kill(0): count zombies as dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class DirLock:
    """`DirLock(directory, flag="--cache-dir", writer="cache build")`: `flag` and `writer` name the
    directory and its kind of writer in the refusal. Use `with` or acquire / release."""

    def __init__(self, directory: Path, flag: str, writer: str):
        self.path = Path(directory) / LOCK_FILE
        self.flag, self.writer = flag, writer
        self.held = False

    def acquire(self) -> DirLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    holder = {}
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == me["host"] and not pid_alive(pid):
                    log.warning("%s: taking over %s left by pid %d, which no longer runs", self.writer, self.path, pid)
                    self.path.unlink(missing_ok=True)
                    continue
                raise UsageError(f"{self.flag} {self.path.parent}: another {self.writer} holds it (pid {pid} on {host}, "
                                 f"since {holder.get('since')}); wait for it, or delete {self.path} if it is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UsageError(f"{self.flag} {self.path.parent}: could not take {self.path}; is another {self.writer} starting?")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
