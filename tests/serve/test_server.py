"""`vla-ds serve` answers exactly what `predict` answers, to many clients at once, and only to those
holding the token."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from tests.helpers.batches import SENSOR_C, SENSOR_T
from tests.helpers.runs import REPO
from tests.helpers.serving import VIEWS, make_policy, observation, predict_like_the_server
from tests.serve.plain import plain_observation
from vla_ds.serve import PolicyClient, PolicyError


def test_metadata_describes_the_policy(server):
    with PolicyClient(port=server.port) as client:
        meta = client.metadata
    from vla_ds import __version__

    assert meta["views"] == VIEWS and (meta["horizon"], meta["action_dim"]) == (8, 7)
    assert (meta["sensor_channels"], meta["sensor_length"]) == (SENSOR_C, SENSOR_T)
    assert meta["state_keys"] == ["pose", "joints"] and meta["action_head"] == "regression"
    assert meta["action_units"][:4] == ["robot units"] * 3 + ["degrees"] and meta["vla_ds_version"] == __version__
    assert meta["policy_step"] == 40 and meta["max_message_bytes"] == 4 << 20


@pytest.mark.parametrize("case", ["arrays", "jpeg", "no-sensor", "short-window", "long-window", "no-joints"])
def test_a_round_trip_equals_predict_exactly(server, policy, case):
    obs = observation(3, as_jpeg=case == "jpeg", joints=case != "no-joints",
                      sensor_rows={"no-sensor": None, "short-window": 5, "long-window": 3 * SENSOR_T}.get(case, SENSOR_T))
    with PolicyClient(port=server.port) as client:
        reply = client.request(obs)
        again = client.request(obs)
    want = predict_like_the_server(policy, obs)
    assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (8, 7)
    assert np.array_equal(reply["actions"], want)
    assert reply["server_ms"] > 0 and reply["policy_step"] == 40 and again["request"] == reply["request"] + 1
    assert not np.array_equal(want, predict_like_the_server(policy, observation(4))), "inputs must matter"


def test_sixteen_concurrent_clients_each_get_their_own_answers(server, policy):
    """16 threads, 4 requests each, all different; batched on the server, matched back by id."""
    before = dict(server.stats)
    got: dict[int, np.ndarray] = {}
    errors = []

    def client_thread(c: int):
        try:
            with PolicyClient(port=server.port) as client:
                for r in range(4):
                    seed = 100 + 4 * c + r
                    got[seed] = client.infer(observation(seed, sensor_rows=None if seed % 3 == 0 else SENSOR_T,
                                                         joints=seed % 2 == 0))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == [] and sorted(got) == list(range(100, 164))
    assert server.stats["requests"] - before["requests"] == 64
    assert server.stats["largest_batch"] > 1, "concurrent requests were never batched"
    for seed, actions in got.items():  # a batch computes what each request alone would, to float rounding
        want = predict_like_the_server(policy, observation(seed, sensor_rows=None if seed % 3 == 0 else SENSOR_T,
                                                           joints=seed % 2 == 0))
        np.testing.assert_allclose(actions, want, rtol=1e-4, atol=1e-5, err_msg=f"request {seed}")


def test_a_flow_policy_answers_each_request_from_its_own_seed(tiny_model_dir):
    from vla_ds.serve.server import PolicyServer

    policy = make_policy(tiny_model_dir, action_head="flow", flow_steps=4)
    srv = PolicyServer(policy, port=0, max_batch=8, max_wait_ms=20)
    srv.start()
    try:
        out: dict[int, np.ndarray] = {}

        def ask(seed):
            with PolicyClient(port=srv.port) as client:
                out[seed] = client.infer(observation(seed))

        threads = [threading.Thread(target=ask, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert srv.stats["largest_batch"] > 1
        for seed in range(6):
            np.testing.assert_allclose(out[seed], predict_like_the_server(policy, observation(seed)), rtol=1e-4,
                                       atol=1e-5)
        assert not np.allclose(out[0], out[1])
    finally:
        srv.stop()


def test_the_token_is_required_before_any_model_work(policy):
    from websockets.exceptions import InvalidStatus

    from vla_ds.serve.server import PolicyServer

    srv = PolicyServer(policy, port=0, token="s3cret")
    srv.start()
    try:
        for token in (None, "wrong", "s3cret2"):
            with pytest.raises(InvalidStatus) as e:
                PolicyClient(port=srv.port, token=token)
            assert e.value.response.status_code == 401
        assert srv.stats["refused"] == 3 and srv.stats["batches"] == 0
        with PolicyClient(port=srv.port, token="s3cret") as client:
            assert client.infer(observation(1)).shape == (8, 7)
    finally:
        srv.stop()


def test_the_client_checks_before_sending(server):
    with PolicyClient(port=server.port) as client:
        obs = observation(1)
        obs["images"] = obs["images"][:1]
        with pytest.raises(PolicyError, match=r"observation.images: 1 image\(s\), expected a list of 2: view1, view5") \
                as e:
            client.infer(obs)
        assert e.value.field == "observation.images"
        big = observation(1)
        big["sensor"] = np.zeros((70000, SENSOR_C), np.float32)  # 4.5 MiB: over the fixture's 4 MiB limit
        with pytest.raises(PolicyError, match="over the server's limit"):
            client.infer(big)
        assert client.infer(observation(2)).shape == (8, 7)  # the connection is still good


@pytest.mark.slow
def test_the_robot_side_needs_no_torch(server, policy, tmp_path):
    """PolicyClient in a process where importing torch fails: it still connects, checks and infers."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises
        import numpy as np
        from vla_ds.serve import PolicyClient
        from tests.serve.plain import plain_observation
        with PolicyClient(port={server.port}) as client:
            a = client.infer(plain_observation(7))
        assert "torch" not in [m for m, v in sys.modules.items() if v is not None]
        np.save(sys.argv[1], a)
    """)
    out = tmp_path / "actions.npy"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(np.load(out), predict_like_the_server(policy, plain_observation(7)))
