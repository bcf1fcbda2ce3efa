"""Is a directory of files whole? A manifest written when it was, and a cheap check against it.

`write_manifest(d)` records every file under `d` with its size in `d/manifest.json` (written last,
atomically). `check(d)` returns None when every recorded file is present, readable and of its
recorded size, and each file's own structure is whole (a JSON file parses, a safetensors header
fits its file, a zip -- torch.save's format -- has its central directory), else one phrase naming
the first damaged file. It reads headers and sizes, never a whole weight file, so checking a
3B-parameter optimizer state costs milliseconds. A directory without a manifest (written by an
older vla-ds) gets the structure checks only.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

from vla_ds.utils.io import write_json

MANIFEST = "manifest.json"
_JSON_PARSE_LIMIT = 64 << 20  # bigger JSON files get the size check only


def file_sizes(root: Path) -> dict[str, int]:
    """{relative path: size} of the regular files under `root`, the manifest itself excepted."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink() and p != root / MANIFEST}


def write_manifest(root: Path) -> None:
    """Record the files under `root` and their sizes in `root/manifest.json`."""
    write_json(Path(root) / MANIFEST, {"format": 1, "files": file_sizes(root)})


def check(root: Path) -> str | None:
    """None when `root` is whole, else why not (one phrase naming the file)."""
    root = Path(root)
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for rel, size in recorded.items():
            path = root / rel
            if not path.is_file():
                return f"{rel} is missing"
            actual = path.stat().st_size
            if actual != size:
                return f"{rel} is {actual} bytes, {size} when it was saved"
    else:
        recorded = file_sizes(root)
    files = [root / rel for rel in sorted(recorded)]
    for path in files:
        why = structure(path)
        if why:
            return f"{path.relative_to(root).as_posix()} is {why}"
    return None


def structure(path: Path) -> str | None:
    """What is wrong with the file's own structure, judged by its kind (header reads only), or None."""
    if not os.access(path, os.R_OK):
        return "not readable (permissions)"
    try:
        if path.suffix == ".json":
            if path.stat().st_size <= _JSON_PARSE_LIMIT:
                json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            return _safetensors_structure(path)
        elif zipfile.is_zipfile(path) or path.suffix in (".pt", ".bin"):
            with zipfile.ZipFile(path) as z:
                z.infolist()
    except (OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError, AttributeError, KeyError, TypeError) as e:
        return f"unreadable ({' '.join(str(e).split())[:120] or type(e).__name__})"
    return None


def _safetensors_structure(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"truncated ({size} bytes, its header alone needs {n + 8})"
        header = json.loads(f.read(n))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"truncated ({size} of {8 + n + end} bytes)"
    return None
