"""A tiny policy (sensor, robot state, two views) served on a free port for the tests of this folder.
The server runs in this process on a thread: the tests call the same policy's `predict` to compare
(tests/helpers/serving.py)."""
from __future__ import annotations

import pytest

from tests.helpers.serving import make_policy


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return make_policy(tiny_model_dir)


@pytest.fixture(scope="module")
def server(policy):
    """A running PolicyServer of `policy` (batches of up to 8, waiting 5 ms for more)."""
    from vla_ds.serve.server import PolicyServer

    srv = PolicyServer(policy, port=0, max_batch=8, max_wait_ms=5, max_message_bytes=4 << 20, step=40)
    srv.start()
    yield srv
    srv.stop()
