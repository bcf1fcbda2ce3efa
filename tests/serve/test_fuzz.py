"""Bad input never takes the server down: >= 200 malformed messages on one connection each get an
error reply naming the field, a message over the size limit closes only its own connection, and a
valid request is answered afterwards (on the same connection, and on others)."""
from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest

from tests.helpers.batches import SENSOR_C
from tests.helpers.serving import observation, predict_like_the_server
from vla_ds.serve.protocol import pack, unpack


@contextlib.contextmanager
def raw(port):
    """A bare websocket (no client-side checks): the first message is the metadata."""
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None) as ws:
        assert unpack(ws.recv(timeout=30))["type"] == "metadata"
        yield ws


def _infer(obs, **extra) -> bytes:
    return pack({"type": "infer", "id": 1, "observation": obs, **extra})


def _edited(seed: int, edit) -> bytes:
    obs = observation(seed)
    edit(obs)
    return _infer(obs)


def malformed(rng: np.random.Generator) -> list[tuple[bytes | str, str]]:
    """(frame, the field its error reply must name): every family several times over."""
    good = _infer(observation(0))
    cases: list[tuple[bytes | str, str]] = []
    for _ in range(40):  # random bytes, and valid messages cut short
        cases.append((rng.bytes(int(rng.integers(1, 300))), "message"))
        cases.append((good[:int(rng.integers(1, len(good) - 1))], "message"))
    cases += [("{\"type\": \"infer\"}", "message"), (msgpack.packb([1, 2, 3]), "message"),
              (msgpack.packb("infer"), "message"), (b"\xc1", "message")]
    for i in range(10):
        s = int(rng.integers(0, 1000))
        cases += [
            (pack({"type": "infer", "id": s, "observation": observation(s), "extra": i}), "extra"),
            (pack({"type": "predict", "id": s, "observation": observation(s)}), "type"),
            (pack({"type": "infer", "id": s, "observation": [1, 2]}), "observation"),
            (_edited(s, lambda o: o.update(speed=3)), "observation.speed"),
            (_edited(s, lambda o: o.pop("instruction")), "observation.instruction"),
            (_edited(s, lambda o: o.update(instruction=42)), "observation.instruction"),
            (_edited(s, lambda o: o.update(images=o["images"][:1])), "observation.images"),
            (_edited(s, lambda o: o.update(images=o["images"] * 2)), "observation.images"),
            (_edited(s, lambda o: o.update(images="view1.jpg")), "observation.images"),
            (_edited(s, lambda o: o["images"].__setitem__(1, o["images"][1][..., 0])), "observation.images[1]"),
            (_edited(s, lambda o: o["images"].__setitem__(0, o["images"][0].astype(np.float32))),
             "observation.images[0]"),
            (_edited(s, lambda o: o["images"].__setitem__(1, rng.bytes(500))), "observation.images[1]"),
            (_edited(s, lambda o: o["images"].__setitem__(0, b"\xff\xd8\xff\xe0" + rng.bytes(64))),
             "observation.images[0]"),
            (_edited(s, lambda o: o["images"].__setitem__(0, b"")), "observation.images[0]"),
            (_edited(s, lambda o: o.update(sensor=np.zeros((30, SENSOR_C + 1), np.float32))), "observation.sensor"),
            (_edited(s, lambda o: o.update(sensor=np.zeros(30, np.float32))), "observation.sensor"),
            (_edited(s, lambda o: o.update(sensor=np.zeros((0, SENSOR_C), np.float32))), "observation.sensor"),
            (_edited(s, lambda o: o["sensor"].__setitem__((3, 2), np.nan)), "observation.sensor"),
            (_edited(s, lambda o: o["sensor"].__setitem__((0, 0), np.inf)), "observation.sensor"),
            (_edited(s, lambda o: o.update(sensor="650x1026")), "observation.sensor"),
            (_edited(s, lambda o: o.pop("state")), "observation.state"),
            (_edited(s, lambda o: o["state"].update(pose=np.zeros(5, np.float32))), "observation.state.pose"),
            (_edited(s, lambda o: o["state"]["pose"].__setitem__(2, np.nan)), "observation.state.pose"),
            (_edited(s, lambda o: o["state"].update(gripper=1.0)), "observation.state.gripper"),
            (_edited(s, lambda o: o["state"].update(joints=[1, 2, 3])), "observation.state.joints"),
            (_edited(s, lambda o: o.update(seed=-1)), "observation.seed"),
            (_edited(s, lambda o: o.update(seed="seven")), "observation.seed"),
            # arrays that lie about themselves: data of the wrong length, an object dtype
            (pack({"type": "infer", "id": s, "observation": {**observation(s), "sensor": {
                "__nd__": 1, "dtype": "<f4", "shape": [30, SENSOR_C], "data": b"\0" * 12}}}), "array"),
            (pack({"type": "infer", "id": s, "observation": {**observation(s), "sensor": {
                "__nd__": 1, "dtype": "|O", "shape": [1], "data": b"\0" * 8}}}), "array"),
        ]
    return cases


def test_two_hundred_malformed_messages_then_a_valid_one(server, policy):
    cases = malformed(np.random.default_rng(0))
    assert len(cases) >= 200
    before = dict(server.stats)
    with raw(server.port) as ws:
        for frame, field in cases:
            ws.send(frame)
            reply = unpack(ws.recv(timeout=60))
            assert reply["type"] == "error", (field, reply)
            assert reply["field"] == field or reply["field"].startswith(field), (field, reply)
            assert reply["error"].startswith(reply["field"]) and "\n" not in reply["error"]
        ws.send(_infer(observation(5)))
        reply = unpack(ws.recv(timeout=60))
    assert reply["type"] == "result" and reply["id"] == 1
    assert np.array_equal(reply["actions"], predict_like_the_server(policy, observation(5)))
    assert server.stats["errors"] - before["errors"] == len(cases)
    assert server.stats["requests"] - before["requests"] == 1


def test_an_oversized_message_closes_only_its_own_connection(server, policy):
    from websockets.exceptions import ConnectionClosed

    with raw(server.port) as other:
        with raw(server.port) as ws:
            ws.send(b"\0" * (server.max_message_bytes + 1))
            with pytest.raises(ConnectionClosed) as e:
                ws.recv(timeout=30)
            assert e.value.rcvd is not None and e.value.rcvd.code == 1009  # "message too big"
        other.send(_infer(observation(6)))  # the connection beside it still works
        reply = unpack(other.recv(timeout=60))
    assert np.array_equal(reply["actions"], predict_like_the_server(policy, observation(6)))
