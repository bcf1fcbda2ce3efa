"""`vla-ds preprocess SRC... --out DATASET_DIR`: recordings in, vla-ds episodes out.

Per source session: read it (`vla_ds.data.sources`), check every image decodes, optionally
downscale images (`--max-side`), copy the sensor stream once into an uncompressed `sensor.npy`
(streamed in chunks: a session's A-scans never sit in memory whole), and write the episode
directory atomically (temp dir + rename). A source whose files and options are unchanged since
the last ingest is skipped, so re-running is cheap and safe. A summary of what was written and
what was dropped (and why) goes to `DATASET_DIR/summary.json`.

Bad input raises `SourceError` naming the file, or with `skip_bad` is counted and skipped at the
smallest sensible unit (a frame, a sensor window, a session).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vla_ds.data.format import (
    EPISODES_DIR,
    FLOAT16_SAFE_MAX,
    SENSOR_CHANNELS,
    SENSOR_FILE,
    SENSOR_TIME_FILE,
    EpisodeMeta,
    FrameTable,
    write_dataset_marker,
)
from vla_ds.data.sources import RawEpisode, SourceError, discover_sources, read_source
from vla_ds.data.summary import summarize
from vla_ds.errors import UsageError
from vla_ds.utils.io import atomic_dir, remove_stale_temporaries, write_json
from vla_ds.utils.lock import DirLock

log = logging.getLogger(__name__)
CHUNK_ROWS = 8192
INGEST_VERSION = 1


@dataclass
class IngestOptions:
    """What `vla-ds preprocess` does to each session (all of it enters the idempotence key)."""

    instruction: str | None = None  # one instruction for every source (overrides the rest)
    instructions_file: str | None = None  # JSON {folder name or glob: instruction}
    max_side: int = 448  # downscale images so the longer side is at most this (0 = keep originals in place)
    tolerance_s: float = 0.05  # camera/robot matching tolerance
    sensor_dtype: str = "float16"  # float16 halves disk and read bandwidth; float32 if values exceed its range
    skip_bad: bool = False  # count and skip bad frames/sessions instead of stopping
    allow_external_images: bool = False  # frame lists may name images outside their own folder
    sensor_channels: int = SENSOR_CHANNELS  # what the model will read: a stream of another width is refused (a check only)

    def __post_init__(self):
        if self.max_side < 0:
            raise UsageError("--max-side must be >= 0 (0 keeps the original images)")
        if self.sensor_dtype not in ("float16", "float32"):
            raise UsageError("--sensor-dtype must be float16 or float32")
        if not 0 < self.tolerance_s < 1:
            raise UsageError("--tolerance must be between 0 and 1 second")


# ----------------------------------------------------------------------------- instructions


_GENERIC_NAME = re.compile(r"^(recv_all_.*|(session|episode|run|rec|recording)[_-]?\d+|[\d_\-]+)$", re.IGNORECASE)


def _humanize(name: str) -> str:
    words = re.sub(r"[_\-]+", " ", re.sub(r"\d{6,}", "", name)).strip()
    return f"Perform the task: {words}." if words else ""


def resolve_instruction(source: Path, opts: IngestOptions, mapping: dict[str, str]) -> tuple[str, str]:
    """(instruction, where it came from): the flag, the mapping file, an `instruction.txt` in the
    session folder or its parent, else a sentence made from the task folder's name."""
    if opts.instruction:
        return opts.instruction, "flag"
    names = [source.name, source.parent.name]
    for pattern, text in mapping.items():
        if any(fnmatch.fnmatch(n, pattern) for n in names):
            return text, f"mapping:{opts.instructions_file}"
    for d in (source, source.parent):
        f = d / "instruction.txt"
        if f.is_file() and f.read_text().strip():
            return f.read_text().strip(), f"file:{f}"
    # recorder folders are named by date (recv_all_2025...) or number (session_003); the task is
    # then named by their parent folder
    name = source.parent.name if _GENERIC_NAME.match(source.name) else source.name
    text = _humanize(name) or _humanize(source.parent.name)
    if not text:
        raise SourceError(f"{source}: no instruction; pass --instruction or --instructions FILE")
    return text, "folder-name"


def load_mapping(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SourceError(f"--instructions {path}: unreadable ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise SourceError(f"--instructions {path}: expected a JSON object {{folder name or glob: instruction}}")
    return data


# ----------------------------------------------------------------------------- writing


def episode_id_for(source: Path) -> str:
    """Readable and unique: the folder name plus a hash of its absolute path."""
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    name = source.name if not source.name.startswith("recv_all_") else f"{source.parent.name}-{source.name}"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{digest}"


def fingerprint(raw: RawEpisode, opts: IngestOptions, instruction: str) -> str:
    external = "|external" if opts.allow_external_images else ""  # (only when set: older keys stay valid)
    h = hashlib.sha256(f"{INGEST_VERSION}|{raw.layout}|{instruction}|{opts.max_side}|{opts.tolerance_s}|{opts.sensor_dtype}|{opts.skip_bad}{external}".encode())
    for f in sorted(raw.files):
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _write_image(src: Path, dst: Path | None, max_side: int) -> None:
    """Decode `src` fully (catches truncated files); re-encode to `dst` if given."""
    from PIL import Image

    try:
        with Image.open(src) as im:
            im.load()
            if dst is None:
                return
            im = im.convert("RGB")
            if max(im.size) > max_side:
                scale = max_side / max(im.size)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
            dst.parent.mkdir(parents=True, exist_ok=True)
            im.save(dst, quality=90)
    except (OSError, SyntaxError, ValueError) as e:
        raise SourceError(f"{src}: unreadable image ({e})") from None


def _write_images(raw: RawEpisode, tmp: Path, opts: IngestOptions, dropped: Counter) -> tuple[dict, np.ndarray]:
    """Checked (and optionally downscaled) images; returns per-view paths and a keep-mask of frames."""
    reference = next(iter(v for v in ("View1",) if v in raw.images), sorted(raw.images)[0])
    n = len(raw.timestamp)
    keep = np.ones(n, bool)
    out: dict[str, list[str | None]] = {v: [None] * n for v in raw.images}
    for i in range(n):
        for view in [reference] + [v for v in raw.images if v != reference]:
            src = raw.images[view][i]
            if src is None or not keep[i]:
                continue
            rel = f"images/{view}/{i:06d}.jpg"
            try:
                _write_image(src, tmp / rel if opts.max_side else None, opts.max_side)
            except SourceError as e:
                if not opts.skip_bad:
                    raise SourceError(f"{e}; copy it again from the recorder, or pass --skip-bad to drop it") from None
                log.warning("skipped: %s", e)
                dropped[f"corrupt_image:{view}"] += 1
                if view == reference:
                    keep[i] = False
                continue
            out[view][i] = rel if opts.max_side else str(src.resolve())
    return out, keep


def _stream_npz_rows(path: Path, key: str, lo: int, hi: int):
    """Yield row chunks [lo, hi) of a 2-D npz member without loading the whole array."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            arr = np.load(path)[key]
            for s in range(lo, hi, CHUNK_ROWS):
                yield arr[s : min(hi, s + CHUNK_ROWS)]
            return
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        f.seek(lo * row_bytes, 1) if f.seekable() else f.read(lo * row_bytes)
        for s in range(lo, hi, CHUNK_ROWS):
            m = min(hi, s + CHUNK_ROWS) - s
            yield np.frombuffer(f.read(m * row_bytes), dtype=dtype).reshape(m, *shape[1:])


def _write_sensor(raw: RawEpisode, tmp: Path, opts: IngestOptions, dropped: Counter):
    """Copy the part of the sensor stream that frames use into sensor.npy; return row ranges."""
    with np.load(raw.sensor_npz) as z:
        t = np.asarray(z["timestamps"], np.float64)
        force = np.asarray(z["forces"], np.float32)
    if np.any(np.diff(t) < 0):
        raise SourceError(f"{raw.sensor_npz}: timestamps are not sorted")
    start = np.searchsorted(t, raw.sensor_window[:, 0], side="right")
    end = np.searchsorted(t, raw.sensor_window[:, 1], side="right")
    lo, hi = int(start.min()), int(max(end.max(), start.min()))
    rows = hi - lo
    nan_rows: list[np.ndarray] = []
    peak = float(np.abs(force[lo:hi]).max()) if rows else 0.0
    # First pass over the A-scans: NaN rows and value range (for the float16 decision).
    for k, chunk in enumerate(_stream_npz_rows(raw.sensor_npz, "alines", lo, hi)):
        bad = ~np.isfinite(chunk).all(axis=1) | ~np.isfinite(force[lo + k * CHUNK_ROWS : lo + k * CHUNK_ROWS + len(chunk)])
        if bad.any():
            nan_rows.append(np.nonzero(bad)[0] + k * CHUNK_ROWS)
        finite = chunk[np.isfinite(chunk)]
        if finite.size:
            peak = max(peak, float(np.abs(finite).max()))
    nan_idx = np.concatenate(nan_rows) if nan_rows else np.zeros(0, np.int64)
    if len(nan_idx) and not opts.skip_bad:
        raise SourceError(f"{raw.sensor_npz}: {len(nan_idx)} sensor rows contain NaN/inf (first at row {lo + nan_idx[0]}); use --skip-bad to drop their windows")
    dtype = np.float16 if opts.sensor_dtype == "float16" and peak <= FLOAT16_SAFE_MAX else np.float32
    out = np.lib.format.open_memmap(tmp / SENSOR_FILE, mode="w+", dtype=dtype, shape=(rows, 1 + raw.sensor_ascan))
    for k, chunk in enumerate(_stream_npz_rows(raw.sensor_npz, "alines", lo, hi)):
        s = k * CHUNK_ROWS
        out[s : s + len(chunk), 0] = force[lo + s : lo + s + len(chunk)]
        out[s : s + len(chunk), 1:] = chunk
    if len(nan_idx):
        out[nan_idx] = 0
    out.flush()
    del out
    np.save(tmp / SENSOR_TIME_FILE, t[lo:hi])
    start, end = start - lo, end - lo
    if len(nan_idx):  # frames whose window holds a NaN row lose their sensor reading (counted)
        hit = np.searchsorted(nan_idx, start) < np.searchsorted(nan_idx, end)
        dropped["sensor_window_with_nan"] += int(hit.sum())
        end = np.where(hit, start, end)
    return start.astype(np.int64), end.astype(np.int64), {"rows": rows, "channels": 1 + raw.sensor_ascan, "dtype": np.dtype(dtype).name}


def write_episode(raw: RawEpisode, dataset_dir: Path, opts: IngestOptions, instruction: tuple[str, str]) -> dict:
    """Write one episode atomically; returns its summary record."""
    episode_id = episode_id_for(raw.path)
    ep_dir = dataset_dir / EPISODES_DIR / episode_id
    fp = fingerprint(raw, opts, instruction[0])
    if (ep_dir / "meta.json").is_file():
        try:
            old = EpisodeMeta.load(ep_dir)
            if old.source.get("fingerprint") == fp:
                return {"episode_id": episode_id, "status": "unchanged", **_counts(old)}
        except (ValueError, TypeError, KeyError):
            pass  # unreadable old meta: rewrite
    dropped = Counter(raw.dropped)
    with atomic_dir(ep_dir) as tmp:
        images, keep = _write_images(raw, tmp, opts, dropped)
        sensor_start = sensor_end = None
        sensor_info = None
        if raw.sensor_npz is not None:
            sensor_start, sensor_end, sensor_info = _write_sensor(raw, tmp, opts, dropped)
            sensor_start, sensor_end = sensor_start[keep], sensor_end[keep]
        table = FrameTable(
            timestamp=raw.timestamp[keep],
            pose=raw.pose[keep],
            joints=raw.joints[keep],
            images={v: [p for p, k in zip(col, keep) if k] for v, col in images.items()},
            sensor_start=sensor_start,
            sensor_end=sensor_end,
        )
        if len(table) < 2:
            raise SourceError(f"{raw.path}: fewer than 2 usable frames (an episode needs a next frame to define actions)")
        table.save(tmp)
        # a sample is frame i (0..N-2: it needs a next frame); it has a sensor reading when its
        # window holds at least one row
        sensor_samples = int(np.sum(table.sensor_end[:-1] > table.sensor_start[:-1])) if sensor_info else 0
        has_sensor = sensor_samples > 0
        meta = EpisodeMeta(
            episode_id=episode_id,
            instruction=instruction[0],
            instruction_source=instruction[1],
            views=list(table.images),
            num_frames=len(table),
            has_sensor=has_sensor,
            sensor_samples=sensor_samples,
            source={"layout": raw.layout, "path": str(raw.path.resolve()), "fingerprint": fp},
            rates={"frame_spacing_s": raw.frame_spacing_s, "robot_hz": 100.0 if raw.layout == "A" else None, "sensor_hz": _sensor_hz(tmp) if has_sensor else None},
            sensor=sensor_info if has_sensor else None,
            dropped={k: v for k, v in dropped.items() if v},
            missing_views={v: sum(p is None for p in col) for v, col in table.images.items() if any(p is None for p in col)},
            has_joints=raw.has_joints,
        )
        meta.save(tmp)
    return {"episode_id": episode_id, "status": "written", **_counts(meta)}


def _sensor_hz(ep_dir: Path) -> float | None:
    t = np.load(ep_dir / SENSOR_TIME_FILE)
    return float((len(t) - 1) / (t[-1] - t[0])) if len(t) > 1 and t[-1] > t[0] else None


def _counts(meta: EpisodeMeta) -> dict:
    return {
        "frames": meta.num_frames,
        "samples": max(meta.num_frames - 1, 0),
        "has_sensor": meta.has_sensor,
        "sensor_samples": meta.sensor_samples,
        "dropped": meta.dropped,
        "missing_views": meta.missing_views,
        "instruction": meta.instruction,
    }


# ----------------------------------------------------------------------------- orchestration


def ingest_source(layout: str, path: Path, dataset_dir: Path, opts: IngestOptions) -> dict:
    """Read + write one session; bad input either raises or (skip_bad) returns a 'skipped' record."""
    try:
        raw = read_source(layout, path, opts.tolerance_s, opts.skip_bad, opts.allow_external_images)
        channels = 1 + raw.sensor_ascan
        if raw.sensor_npz is not None and channels != opts.sensor_channels:
            raise SourceError(f"{raw.sensor_npz}: {channels} sensor channels (1 force + {raw.sensor_ascan} A-scan), but "
                              f"--sensor-input-channels is {opts.sensor_channels}; for this sensor pass "
                              f"--sensor-input-channels {channels} to preprocess and to training")
        instruction = resolve_instruction(path, opts, load_mapping(opts.instructions_file))
        return write_episode(raw, dataset_dir, opts, instruction)
    except SourceError as e:
        if not opts.skip_bad:
            raise
        log.warning("skipped session: %s", e)
        return {"episode_id": None, "source": str(path), "status": "skipped", "reason": str(e)}


def preprocess(sources: list[str], dataset_dir: str | os.PathLike, opts: IngestOptions, workers: int = 1) -> dict:
    """Ingest every session under `sources` into `dataset_dir`; returns (and writes) the summary.
    Holds `dataset_dir/.lock` meanwhile (a second preprocess into it is refused) and first removes
    the temporary folders an interrupted run left (`utils.io` names them; none is a live writer's)."""
    dataset_dir = Path(dataset_dir)
    found = discover_sources(sources)
    if not found:
        raise SourceError(f"preprocess: no sessions found under {' '.join(sources)}")
    load_mapping(opts.instructions_file)  # fail on a bad mapping file before any work
    dataset_dir.mkdir(parents=True, exist_ok=True)
    with DirLock(dataset_dir, "--out", "preprocess"):  # so the temporaries found below are no live writer's
        for d in (dataset_dir, dataset_dir / EPISODES_DIR):
            for stale in remove_stale_temporaries(d):
                log.info("preprocess: removed %s, left by an interrupted run", stale)
        write_dataset_marker(dataset_dir)
        summary = summarize(_ingest_all(found, dataset_dir, opts, workers))
        write_json(dataset_dir / "summary.json", summary)
    return summary


def _ingest_all(found: list[tuple[str, Path]], dataset_dir: Path, opts: IngestOptions, workers: int) -> list[dict]:
    from vla_ds.utils.progress import progress

    records = []
    with progress(total=len(found), desc="preprocess", unit="session") as bar:
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers) as pool:
                futures = [pool.submit(ingest_source, lay, p, dataset_dir, opts) for lay, p in found]
                for fut in futures:
                    records.append(fut.result())
                    bar.update(1)
        else:
            for lay, p in found:
                records.append(ingest_source(lay, p, dataset_dir, opts))
                bar.update(1)
    return records
