"""Recorder sessions with exactly known values (both input layouts), for the ingest tests."""
from __future__ import annotations

import numpy as np

from vla_ds.data.synthetic import RobotTrack, SensorTrack

T0 = 1761551500.0
SENSOR_HZ = 650.0


def ramp_robot(t0: float = T0, duration: float = 6.0) -> RobotTrack:
    """100 Hz ramp: x +1/s, z -0.5/s, yaw a from 179.6 deg at +0.2 deg/s (crosses +180 -> -180
    between t0+2 and t0+3), pitch b from -179.9 deg at -0.1 deg/s (crosses -180 -> +180 at once)."""
    t = t0 - 1.0 + np.arange(int((duration + 2) * 100)) / 100.0
    s = t - t0
    a = np.mod(179.6 + 0.2 * s + 180.0, 360.0) - 180.0
    b = np.mod(-179.9 - 0.1 * s + 180.0, 360.0) - 180.0
    pose = np.stack([1.0 * s, np.zeros_like(s), -0.5 * s, a, b, np.full_like(s, 45.0)], axis=1)
    joints = np.stack([s * (j + 1) for j in range(6)], axis=1)
    return RobotTrack(t, pose, joints)


def index_sensor(t_start: float, t_end: float, ascan: int = 1025) -> SensorTrack:
    """Row k at t_start + (k + 0.5)/650 (half-period offset: no ties at frame times); force = k,
    every A-scan sample of row k = k % 1000 (so windows are identifiable)."""
    n = int((t_end - t_start) * SENSOR_HZ)
    k = np.arange(n)
    t = t_start + (k + 0.5) / SENSOR_HZ
    alines = np.repeat((k % 1000).astype(np.float32)[:, None], ascan, axis=1)
    return SensorTrack(t, k.astype(np.float32), alines)
