"""Readers for the two recording layouts users have (see `vla_ds.data.synthetic` for both).

Each reader turns one source folder into a `RawEpisode`: frames matched across cameras, the robot
pose at each frame, and (when present) where each frame's sensor window lies in the sensor npz.
Nothing here writes; `vla_ds.data.ingest` does. Images are only listed here, never decoded.

Clocks: camera file names, `recv_timestamp` of the robot CSV and the sensor `timestamps` are all
host (unix) time; the CSV's `origin_timestamp` is the robot's own clock and is not used for
matching.
"""
from __future__ import annotations

import csv
import json
import logging
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vla_ds.data.format import ANGLE_DIMS, wrap_degrees
from vla_ds.errors import UsageError

log = logging.getLogger(__name__)

IMAGE_TIME = re.compile(r"_(\d{9,11}(?:\.\d+)?)\.(?:jpe?g|png)$", re.IGNORECASE)
VIEW_JSON = re.compile(r"(View\d+)(?:_(left|right))?(?:_single)?\.json$", re.IGNORECASE)
ROBOT_COLUMNS = ["recv_timestamp"] + [f"joint_{i}" for i in range(1, 7)] + [f"pose_{c}" for c in "xyzabr"]
SENSOR_KEYS = {"timestamps": 1, "forces": 1, "alines": 2}


class SourceError(UsageError):
    """A source file is unusable; the message names the file and what is wrong."""


@dataclass
class RawEpisode:
    """One recording, frames matched, ready to be written in the vla-ds format."""

    layout: str  # "A" or "B"
    path: Path
    files: list[Path]  # every source file read (for the idempotence fingerprint)
    timestamp: np.ndarray  # (N,)
    pose: np.ndarray  # (N, 6)
    joints: np.ndarray  # (N, 6)
    images: dict[str, list[Path | None]]  # view -> N source image paths (None: no frame within tolerance)
    sensor_npz: Path | None = None
    sensor_window: np.ndarray | None = None  # (N, 2) float [start, end] in sensor time
    dropped: Counter = field(default_factory=Counter)
    frame_spacing_s: float = 0.0
    sensor_ascan: int = 0  # A-scan samples per sensor row (alines width)
    has_joints: bool = True  # False: recorded without joint angles (`joints` is zeros)


# ----------------------------------------------------------------------------- shared helpers


def _median_spacing(t: np.ndarray) -> float:
    return float(np.median(np.diff(t))) if len(t) > 1 else 1.0


def match_views(times: dict[str, np.ndarray], reference: str, tolerance_s: float) -> dict[str, np.ndarray]:
    """For each view, the index of its frame nearest to each reference frame (-1 beyond tolerance)."""
    ref = times[reference]
    out = {}
    for view, t in times.items():
        if view == reference:
            out[view] = np.arange(len(ref))
            continue
        if len(t) == 0:
            out[view] = np.full(len(ref), -1)
            continue
        j = np.searchsorted(t, ref).clip(1, len(t) - 1) if len(t) > 1 else np.zeros(len(ref), int)
        if len(t) > 1:
            j = np.where(np.abs(t[j - 1] - ref) <= np.abs(t[j] - ref), j - 1, j)
        out[view] = np.where(np.abs(t[j] - ref) <= tolerance_s, j, -1)
    return out


def interpolate_pose(t_robot: np.ndarray, pose: np.ndarray, joints: np.ndarray, t: np.ndarray):
    """Robot pose/joints at times `t` (linear; angles along the shortest arc across +-180)."""
    i = np.searchsorted(t_robot, t).clip(1, len(t_robot) - 1)
    t0, t1 = t_robot[i - 1], t_robot[i]
    w = np.clip((t - t0) / np.maximum(t1 - t0, 1e-9), 0.0, 1.0)[:, None]
    p0, p1 = pose[i - 1], pose[i]
    out = p0 + w * (p1 - p0)
    ang = list(ANGLE_DIMS)
    out[:, ang] = wrap_degrees(p0[:, ang] + w * wrap_degrees(p1[:, ang] - p0[:, ang]))
    return out, joints[i - 1] + w * (joints[i] - joints[i - 1])


def check_sensor_npz(path: Path) -> dict[str, tuple]:
    """Shapes of the npz members, checked without loading the A-scans. Raises SourceError."""
    try:
        with zipfile.ZipFile(path) as zf:
            shapes, dtypes = {}, {}
            for name in zf.namelist():
                with zf.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    shape, _, dtype = (
                        np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
                    )
                shapes[name.removesuffix(".npy")], dtypes[name.removesuffix(".npy")] = shape, dtype
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise SourceError(f"{path}: not a readable npz ({e})") from None
    missing = [k for k in SENSOR_KEYS if k not in shapes]
    if missing:
        raise SourceError(f"{path}: missing key(s) {', '.join(missing)}; expected timestamps, forces, alines")
    for key in SENSOR_KEYS:  # np.load(allow_pickle=False) would refuse an object array in a traceback
        if dtypes[key].kind not in "biuf":
            what = "Python objects (dtype object), which vla-ds never unpickles" if dtypes[key].hasobject else f"dtype {dtypes[key]}"
            raise SourceError(f"{path}: {key} holds {what}; save it as a numeric array (e.g. np.asarray({key}, np.float32))")
    n = shapes["timestamps"][0] if len(shapes["timestamps"]) == 1 else -1
    for key, ndim in SENSOR_KEYS.items():
        if len(shapes[key]) != ndim or shapes[key][0] != n:
            raise SourceError(f"{path}: {key} has shape {shapes[key]}; expected ({n}{', A' if ndim == 2 else ''}) like timestamps")
    if n == 0:
        raise SourceError(f"{path}: the sensor stream is empty")
    return shapes


def _window_from_previous(t: np.ndarray) -> np.ndarray:
    """Sensor window of each frame: (previous frame time, this frame's time]."""
    prev = np.concatenate([[t[0] - _median_spacing(t)], t[:-1]])
    return np.stack([prev, t], axis=1)


# ----------------------------------------------------------------------------- layout A


def _list_views_a(session: Path) -> dict[str, list[Path]]:
    views: dict[str, list[Path]] = {}
    for d in sorted(session.glob("View*")):
        if not d.is_dir():
            continue
        sides = [s for s in ("left", "right") if (d / s).is_dir()]
        if sides:
            for side in sides:
                views[d.name if side == "left" else f"{d.name}_right"] = sorted((d / side).glob("*.jp*g"))
        else:
            views[d.name] = sorted(d.glob("*.jp*g"))
    return {k: v for k, v in views.items() if v}


def _image_times(files: list[Path]) -> tuple[np.ndarray, list[Path], int]:
    kept, times, bad = [], [], 0
    for f in files:
        m = IMAGE_TIME.search(f.name)
        if m is None:
            bad += 1
            continue
        kept.append(f)
        times.append(float(m.group(1)))
    order = np.argsort(times, kind="stable")
    return np.asarray(times, np.float64)[order], [kept[i] for i in order], bad


def read_robot_csv(path: Path, skip_bad: bool = False, dropped: Counter | None = None):
    """(t, pose (M, 6), joints (M, 6)) from a robot_state CSV; clear errors for bad files. A row
    holding NaN/inf is an error naming its line, or with `skip_bad` dropped and counted in `dropped`."""
    dropped = Counter() if dropped is None else dropped
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise SourceError(f"{path}: empty robot state CSV")
        header = [h.strip() for h in header]
        missing = [c for c in ROBOT_COLUMNS if c not in header]
        if missing:
            raise SourceError(f"{path}: missing column(s) {', '.join(missing)}")
        cols = [header.index(c) for c in ROBOT_COLUMNS]
        values = []
        for r in reader:
            if not r:
                continue
            try:
                row = [float(r[c]) for c in cols]
            except (ValueError, IndexError) as e:
                raise SourceError(f"{path}: line {reader.line_num}: unreadable row ({e})") from None
            bad = [name for name, x in zip(ROBOT_COLUMNS, row) if not np.isfinite(x)]
            if bad and not skip_bad:
                raise SourceError(f"{path}: line {reader.line_num}: NaN/inf in {', '.join(bad)}; fix the row or pass "
                                  "--skip-bad to drop such rows")
            if bad:
                dropped["robot_state_nan_rows"] += 1
            else:
                values.append(row)
        rows = np.asarray(values, np.float64).reshape(-1, len(ROBOT_COLUMNS))
    if len(rows) < 2:
        raise SourceError(f"{path}: fewer than 2 robot states")
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    rows = rows[np.concatenate([[True], np.diff(rows[:, 0]) > 0])]
    return rows[:, 0], rows[:, 7:13], rows[:, 1:7]


def read_session_a(session: Path, tolerance_s: float = 0.05, skip_bad: bool = False) -> RawEpisode:
    """Read a raw recorder session `recv_all_*/` (cameras, robot CSV, optional sensor npz)."""
    views = _list_views_a(session)
    if not views:
        raise SourceError(f"{session}: empty session (no View*/ images)")
    csvs = sorted(session.glob("robot_state_*.csv"))
    if not csvs:
        raise SourceError(f"{session}: no robot_state_*.csv")
    npzs = sorted(session.glob("sensor_data_*.npz"))
    dropped: Counter = Counter()
    times, files = {}, {}
    for view, paths in views.items():
        times[view], files[view], bad = _image_times(paths)
        if bad:
            dropped[f"unparseable_image_name:{view}"] += bad
    reference = "View1" if "View1" in times else sorted(times)[0]
    t_robot, pose_r, joints_r = read_robot_csv(csvs[0], skip_bad, dropped)
    t = times[reference]
    ok = (t >= t_robot[0] - tolerance_s) & (t <= t_robot[-1] + tolerance_s)
    dropped["no_robot_state"] += int((~ok).sum())
    match = match_views(times, reference, tolerance_s)
    pose, joints = interpolate_pose(t_robot, pose_r, joints_r, t[ok])
    images = {v: [files[v][j] if j >= 0 else None for j in match[v][ok]] for v in times}
    sensor_npz, window, ascan = None, None, 0
    if npzs:
        ascan = check_sensor_npz(npzs[0])["alines"][1]
        sensor_npz = npzs[0]
        window = _window_from_previous(t)[ok]
    all_files = [f for fs in views.values() for f in fs] + csvs[:1] + npzs[:1]
    return RawEpisode(
        "A", session, all_files, t[ok], pose, joints, images, sensor_npz, window, dropped, _median_spacing(t), ascan
    )


# ----------------------------------------------------------------------------- layout B


def resolve_image_path(image: str, json_dir: Path) -> Path | None:
    """The image as written if it exists, else the longest trailing part of it that exists
    relative to the JSON's folder (paths written on another machine)."""
    p = Path(image)
    if p.is_absolute() and p.exists():
        return p
    parts = [x for x in p.parts if x not in (p.anchor, "")]
    for k in range(len(parts), 0, -1):
        cand = json_dir.joinpath(*parts[-k:])
        if cand.exists():
            return cand
    return None


def _read_frame_list(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list of frames, got {type(data).__name__}")
    for i, fr in enumerate(data):
        try:
            fr["timestamp"], fr["image"], fr["robot_state"]["ee_pose"]
        except (KeyError, TypeError):
            raise SourceError(f"{path}: frame {i} lacks timestamp/image/robot_state.ee_pose") from None
        joints = fr["robot_state"].get("joint_angles", [0.0] * 6)  # optional: see read_session_b
        if len(fr["robot_state"]["ee_pose"]) != 6 or len(joints) != 6:
            raise SourceError(f"{path}: frame {i} ee_pose/joint_angles must have 6 values")
        try:
            values = np.asarray([fr["timestamp"], *fr["robot_state"]["ee_pose"], *joints], np.float64)
        except (TypeError, ValueError):
            values = np.array([np.nan])
        if not np.isfinite(values).all():
            raise SourceError(f"{path}: frame {i} holds NaN/inf or a non-number in timestamp/ee_pose/joint_angles; fix it "
                              "or pass --skip-bad to skip this list")
    return sorted(data, key=lambda fr: fr["timestamp"])


def view_name_b(path: Path) -> str:
    m = VIEW_JSON.search(path.name)
    if m is None:
        return path.stem
    return m.group(1) + ("_right" if (m.group(2) or "").lower() == "right" else "")


def _outside(image: Path, folder: Path) -> bool:
    """Whether `image` (symlinks and `..` resolved) lies outside `folder`."""
    return not image.resolve().is_relative_to(folder.resolve())


def read_session_b(folder: Path, tolerance_s: float = 0.05, skip_bad: bool = False,
                   allow_external_images: bool = False) -> RawEpisode:
    """Read a folder of per-view frame-list JSONs (+ sensor npz beside, when present). An image that
    resolves outside `folder` is refused (`skip_bad`: dropped and counted) unless `allow_external_images`."""
    jsons = sorted(folder.glob("*.json"))
    dropped: Counter = Counter()
    lists: dict[str, list[dict]] = {}
    json_of: dict[str, Path] = {}
    for j in jsons:
        try:
            frames = _read_frame_list(j)
        except SourceError as e:
            if not skip_bad:
                raise
            log.warning("skipped: %s", e)
            dropped["bad_frame_list"] += 1
            continue
        if frames:
            lists[view_name_b(j)] = frames
            json_of[view_name_b(j)] = j
    if not lists:
        raise SourceError(f"{folder}: no frames (no non-empty *_View*_single.json frame lists)")
    reference = "View1" if "View1" in lists else sorted(lists)[0]
    times = {v: np.asarray([fr["timestamp"] for fr in fr_list], np.float64) for v, fr_list in lists.items()}
    match = match_views(times, reference, tolerance_s)
    images: dict[str, list[Path | None]] = {}
    for view, fr_list in lists.items():
        col = []
        for j in match[view]:
            p = resolve_image_path(fr_list[j]["image"], folder) if j >= 0 else None
            if j >= 0 and p is None:
                if not skip_bad:
                    raise SourceError(f"{folder}: image {fr_list[j]['image']} not found (also not relative to the JSON)")
                dropped[f"image_not_found:{view}"] += 1
            elif p is not None and not allow_external_images and _outside(p, folder):
                if not skip_bad:
                    written = fr_list[j]["image"]
                    real = "" if str(p.resolve()) == written else f" (= {p.resolve()})"
                    raise SourceError(f"{json_of[view]}: image {written}{real} lies outside the source folder {folder}; "
                                      "pass --allow-external-images if that is intended")
                dropped[f"external_image:{view}"] += 1
                p = None
            col.append(p)
        images[view] = col
    ref = lists[reference]
    pose = np.asarray([fr["robot_state"]["ee_pose"] for fr in ref], np.float64)
    pose[:, list(ANGLE_DIMS)] = wrap_degrees(pose[:, list(ANGLE_DIMS)])
    # Joint angles are optional in a frame list: an episode has them on every frame or not at all
    # (the state input then sees them as absent); never zeros passed off as a reading.
    without = sum("joint_angles" not in fr["robot_state"] for fr in ref)
    if without:
        log.warning("%s: %d of %d frames have no robot_state.joint_angles: the episode is ingested without joints",
                    folder, without, len(ref))
    joints = (np.zeros((len(ref), 6)) if without else
              np.asarray([fr["robot_state"]["joint_angles"] for fr in ref], np.float64))
    npzs = sorted(folder.glob("sensor_data_*.npz"))
    sensor_npz, window, ascan = None, None, 0
    if npzs:
        ascan = check_sensor_npz(npzs[0])["alines"][1]
        sensor_npz = npzs[0]
        if all("sensor_interval" in fr for fr in ref):
            window = np.asarray([[fr["sensor_interval"]["start"], fr["sensor_interval"]["end"]] for fr in ref], np.float64)
        else:
            window = _window_from_previous(times[reference])
    files = jsons + [p for col in images.values() for p in col if p is not None] + npzs[:1]
    return RawEpisode(
        "B", folder, files, times[reference], pose, joints, images, sensor_npz, window, dropped,
        _median_spacing(times[reference]), ascan, has_joints=not without,
    )


def read_source(layout: str, path: Path, tolerance_s: float = 0.05, skip_bad: bool = False,
                allow_external_images: bool = False) -> RawEpisode:
    """The reader of `layout` ("A" or "B") applied to the session folder `path`."""
    if layout == "A":
        return read_session_a(path, tolerance_s, skip_bad)
    return read_session_b(path, tolerance_s, skip_bad, allow_external_images)


# ----------------------------------------------------------------------------- discovery


def discover_sources(paths: list[str]) -> list[tuple[str, Path]]:
    """(layout, folder) for every session under the given paths or globs.

    A folder is a layout-A session when it holds a robot_state CSV or is named recv_all_* (the
    recorder's name: such a folder is a session even when empty, so an empty or half-copied one is
    reported, not passed over; unless it holds recv_all_* folders itself, an archive unpacked one
    level deep); a layout-B session when it holds *.json frame lists; otherwise its subfolders are
    searched.
    """
    import glob

    found: list[tuple[str, Path]] = []

    def visit(p: Path, depth: int) -> None:
        named = p.name.startswith("recv_all_") and not any(p.glob("*.json")) and not any(p.glob("recv_all_*/"))
        if any(p.glob("robot_state_*.csv")) or named:
            found.append(("A", p))
        elif any(p.glob("*.json")):
            found.append(("B", p))
        elif depth < 4:
            for child in sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")):
                visit(child, depth + 1)

    for spec in paths:
        matches = sorted(glob.glob(str(spec))) or [str(spec)]
        for m in matches:
            p = Path(m)
            if not p.is_dir():
                what = "the glob matches nothing" if glob.has_magic(str(spec)) and not p.exists() else (
                    "not a directory" if p.exists() else "no such directory")
                raise UsageError(f"SRC {spec}: {what}; give session folders, folders holding sessions, or globs")
            visit(p, 0)
    return list(dict.fromkeys(found))
