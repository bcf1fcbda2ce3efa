"""DeepSpeed's JIT-compiled ops: one build directory per environment, and no silent waits.

DeepSpeed compiles its CPU ops on first use (`deepspeed_shm_comm` at the first `init_distributed`,
`cpu_adam` for offload, `fused_adam` for the presets' Adam) into `$TORCH_EXTENSIONS_DIR`, by default
`~/.cache/torch_extensions`, shared by every environment of the user. Seen on this project's machines:
- venvs at different paths rebuild each other's ops there (include paths differ), ~2 min each time:
  so vla-ds's default is one directory per environment (`extensions_dir`);
- every build (and load) holds `<dir>/<op>/lock` (torch's FileBaton: created with O_EXCL, the fd open
  in that process throughout, removed at the end). A process killed meanwhile leaves the file, and
  every later run needing the op waits for it forever, printing nothing: `check_stale_locks` makes
  that one line with the fix, before a command runs.
`build_ops` (`vla-ds build-ops`, run by launch/setup.sh) compiles them up front, so a first run
neither waits minutes in silence nor races other processes to build them.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

from vla_ds.errors import UsageError

log = logging.getLogger(__name__)

# op name (DeepSpeed's builder NAME, also its directory and .so name) -> the builder's class name
CPU_OPS = {"deepspeed_shm_comm": "ShareMemCommBuilder", "cpu_adam": "CPUAdamBuilder", "fused_adam": "FusedAdamBuilder"}
# What vla-ds uses on a CPU: the shm comm op (every process group) and cpu_adam (optimizer offload).
# Not fused_adam: on CPU, vla-ds runs the presets' Adam as torch's (`torch_adam`, vla_ds.train.ds_config).
DEFAULT_OPS = ("deepspeed_shm_comm", "cpu_adam")


def extensions_dir() -> Path:
    """The user's `$TORCH_EXTENSIONS_DIR`; else `<venv>/torch_extensions` (writable venvs); else
    `~/.cache/vla-ds/torch_extensions/<hash of sys.prefix>`. Per environment either way."""
    user = os.environ.get("TORCH_EXTENSIONS_DIR")
    if user:
        return Path(user)
    prefix = Path(sys.prefix)
    own = prefix / "torch_extensions"
    if sys.prefix != sys.base_prefix and os.access(own if own.exists() else prefix, os.W_OK):
        return own
    # A system or read-only environment: still one directory per interpreter prefix.
    digest = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "vla-ds" / "torch_extensions" / digest


def use_extensions_dir() -> Path:
    """Export `extensions_dir()` as TORCH_EXTENSIONS_DIR (torch, DeepSpeed and child processes read
    the variable) and put this interpreter's ninja first on PATH; returns the directory."""
    directory = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(directory)
    # torch runs `ninja` from PATH, in the build directory; Debian's 1.11 and pip's 1.13 hash commands
    # differently, so each switch between them rebuilt every op (~1 min each). Absolute: with a
    # relative PATH entry (PATH=.venv/bin) sys.executable is relative and, in the build directory,
    # finds no ninja, so Debian's ran.
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bin_dir, "ninja")) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
    return directory


def _holders(paths: set[str]) -> dict[str, int]:
    """{path: pid} for those of `paths` some process on this host has open (from /proc/*/fd)."""
    found: dict[str, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # another user's process, or one that just exited
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if (target := os.readlink(f"/proc/{pid}/fd/{fd}")) in paths:
                        found[target] = int(pid)
    return found


def _shared_fs(path: str) -> str | None:
    """The type of the network filesystem `path` lies on (other machines' builds may hold its locks)."""
    best, kind = "", ""
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            _, mount, fstype = line.split()[:3]
            if path.startswith(mount.rstrip("/") + "/") and len(mount) >= len(best):
                best, kind = mount, fstype
    return kind if kind in NETWORK_FS else None


NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "fuse.glusterfs",
              "fuse.sshfs", "9p", "afs", "wekafs"}


def check_stale_locks(directory: str | os.PathLike) -> None:
    """UsageError (one line, with the fix) for a build lock under `directory` that no live process
    on this host holds open: its build was killed and every run needing that op would hang."""
    root = Path(directory)
    if not root.is_dir():
        return
    # <dir>/<op>/lock, and <dir>/py311_cpu/<op>/lock when the dir is torch's default root
    locks = {os.path.realpath(p) for pattern in ("*/lock", "*/*/lock", "*/*/*/lock") for p in root.glob(pattern)}
    if not locks:
        return
    visible = os.path.isdir("/proc")  # no /proc (not Linux): no holder can be seen, none is proven dead
    held = _holders(locks) if visible else {}
    if visible and locks - held.keys():
        # A build that just finished closes the fd before it removes the file: look once more.
        time.sleep(0.2)
        held.update(_holders(locks - held.keys()))
    stale = []
    for lock in sorted(locks):
        op = Path(lock).parent.name
        if lock in held:
            # Every load of an op takes the lock for its ~1 s up-to-date check: only a real build is news.
            with contextlib.suppress(OSError):
                level = logging.INFO if time.time() - os.stat(lock).st_mtime > 5 else logging.DEBUG
                log.log(level, "waiting for the build of %s by pid %d, if this run needs it (%s)", op, held[lock], lock)
            continue
        try:
            owner = os.stat(lock).st_uid
        except FileNotFoundError:  # released meanwhile
            continue
        if not visible or (owner != os.geteuid() and os.geteuid() != 0) or _shared_fs(lock):
            # Its builder may be another user's process (whose fds we cannot see) or another
            # machine's: say so, and let torch wait for it.
            log.warning("no process visible here holds %s: if no build of %s runs anywhere, rm %s", lock, op, lock)
        else:
            stale.append(lock)
    if stale:
        ops = ", ".join(Path(p).parent.name for p in stale)
        raise UsageError(f"a build of DeepSpeed's {ops} op was killed midway and left its lock, so every run "
                         f"that needs it would wait forever; fix: rm {' '.join(stale)} (the next run rebuilds "
                         "it; if another machine shares this directory and is building right now, wait instead)")


def missing_ops(directory: str | os.PathLike | None = None, ops=DEFAULT_OPS) -> list[str]:
    """The ops of `ops` with no compiled `<dir>/<op>/<op>.so` yet (default: `extensions_dir()`)."""
    root = Path(directory) if directory is not None else extensions_dir()
    return [op for op in ops if not (root / op / f"{op}.so").exists()]


def announce_builds(directory: str | os.PathLike, ops) -> list[str]:
    """Log one line per op of `ops` not built yet (a build is a silent minute otherwise); returns them."""
    missing = missing_ops(directory, ops)
    for op in missing:
        log.info("building DeepSpeed's %s op once into %s (about a minute)", op, directory)
    return missing


def build_ops(ops=DEFAULT_OPS) -> list[tuple[str, float, bool]]:
    """Compile (or load, when up to date) DeepSpeed's CPU ops now, into `use_extensions_dir()`.
    Returns (op, seconds, built) per op. On CUDA, DeepSpeed builds its ops with nvcc at first use:
    nothing is done here."""
    unknown = sorted(set(ops) - set(CPU_OPS))
    if unknown:
        raise UsageError(f"unknown op {', '.join(unknown)}; choose from {', '.join(CPU_OPS)}")
    directory = use_extensions_dir()
    check_stale_locks(directory)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        log.info("DeepSpeed's accelerator is %s: its ops are compiled at first use; nothing to build now",
                 accelerator.device_name())
        return []
    done = []
    for op in ops:
        builder = accelerator.create_op_builder(CPU_OPS[op])
        if builder is None or not builder.is_compatible(verbose=False):
            log.warning("DeepSpeed's %s op cannot be built on this machine; DeepSpeed goes without it", op)
            continue
        built = bool(announce_builds(directory, [op]))
        start = time.perf_counter()
        builder.load(verbose=False)
        done.append((op, time.perf_counter() - start, built))
    return done
