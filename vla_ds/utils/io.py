"""Atomic writes: a reader (or a crash) never sees a half-written file or directory.

A crash leaves at most a temporary sibling (`.<name>.<random>.tmp` / `.old`), which
`remove_stale_temporaries` clears for a caller that holds the directory's lock.

Files and directories are written to a temporary sibling on the same filesystem and moved into
place with `os.replace`/`os.rename`, which are atomic on POSIX. What lands gets the umask's normal
modes (0644 files, 0755 directories by default): `mkstemp`/`mkdtemp` and safetensors create 0600/0700,
which a robot-side service running as another user could not read.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_modes(path: str | os.PathLike) -> None:
    """Give `path` and everything under it the modes a plain `open`/`mkdir` would: 0o666 / 0o777
    (0o777 also for a file with any execute bit, e.g. DeepSpeed's zero_to_fp32.py) less the umask."""
    mask = _umask()
    for p in [Path(path), *Path(path).rglob("*")] if Path(path).is_dir() else [Path(path)]:
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o111
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside `path`; on success fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file ordinary permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on success move it to `path`.

    With `replace=True` an existing `path` is swapped out only after the new one is complete
    (renamed aside, new one renamed in, old one deleted), so at every instant either the old or
    the new directory is complete at `path` or at its aside name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        ordinary_modes(tmp)
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} already exists")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rename(path, old / path.name)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# What atomic_file / atomic_dir name their temporaries beside PATH: `.<name>.<8 random>.tmp` (a file
# or directory being written) and `.<name>.<8 random>.old` (the replaced directory, being deleted).
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|old)$")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries atomic_file / atomic_dir left in `directory` (a killed writer's); returns
    them. Only for a caller that knows no writer is live there (it holds the directory's lock)."""
    directory = Path(directory)
    found = sorted(p for p in directory.iterdir() if _TEMPORARY.match(p.name)) if directory.is_dir() else []
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return found
