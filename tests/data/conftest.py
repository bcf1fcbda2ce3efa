"""Small synthetic sessions with exactly known values (both input layouts)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.sessions import T0, index_sensor, ramp_robot
from vla_ds.data.synthetic import write_session_a, write_session_b


@pytest.fixture
def exact_session_a(tmp_path):
    """5 frames 1 s apart; View1_right misses frames 2 (beyond 50 ms) and 4; sensor at 650 Hz."""
    times = {
        "View1": T0 + np.array([0.0, 1.0, 2.0, 3.0, 4.0]),
        "View1_right": T0 + np.array([0.01, 1.02, 2.07, 3.03]),
        "View5": T0 + np.array([0.02, 1.0, 2.0, 2.99, 4.0]),
    }
    sensor = index_sensor(T0 - 1.0, T0 + 4.5)
    root = tmp_path / "src" / "needle_insertion"
    return write_session_a(root, times, ramp_robot(), sensor, image_size=(48, 64))


@pytest.fixture
def exact_session_b(tmp_path):
    """5 frames 0.5 s apart, two views, foreign absolute image paths, no sensor."""
    times = {v: T0 + 100 + np.arange(5) * 0.5 for v in ("View1", "View5")}
    return write_session_b(tmp_path / "src" / "retina_approach", "retina_approach", times, ramp_robot(T0 + 100), None, (48, 64))
