"""`vla-ds serve` as a user runs it: a policy directory from disk, a free port, a client's round trip,
Ctrl-C; and its one-line refusals."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers.runs import REPO
from tests.helpers.serving import observation, predict_like_the_server
from vla_ds.cli import main
from vla_ds.serve import PolicyClient


@pytest.fixture(scope="module")
def policy_dir(policy, tmp_path_factory):
    step = tmp_path_factory.mktemp("run") / "checkpoints" / "step_000040"
    policy.save_pretrained(step / "policy")
    (step / "trainer_state.json").write_text(json.dumps({"step": 40}))
    return step / "policy"


@pytest.mark.slow
def test_serve_from_the_command_line(policy_dir, policy):
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLA_DS_SERVE_TOKEN": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "vla_ds", "serve", str(policy_dir), "--port", "0", "--device", "cpu"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        port, seen, deadline = None, [], time.monotonic() + 180
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"on ws://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, "".join(seen)[-3000:]
        with PolicyClient(port=port, token="from-env") as client:
            assert client.metadata["policy_step"] == 40
            reply = client.request(observation(11, as_jpeg=True))
        assert np.array_equal(reply["actions"], predict_like_the_server(policy, observation(11, as_jpeg=True)))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130  # "interrupted", not a traceback
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_serve_refusals_are_one_line(policy_dir, tmp_path, caplog):
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in caplog.text
    assert main(["serve", str(policy_dir), "--max-batch", "0"]) == 2
    assert "--max-batch 0" in caplog.text
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(policy_dir), "--port", str(taken.getsockname()[1]), "--device", "cpu"]) == 2
    assert "cannot listen there" in caplog.text
