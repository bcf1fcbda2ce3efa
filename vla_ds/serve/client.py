"""`PolicyClient`: the robot side of `vla-ds serve`. numpy, msgpack and websockets only: no torch.

    from vla_ds.serve import PolicyClient

    with PolicyClient("gpu-box", 8765, token="...") as client:
        print(client.metadata["views"], client.metadata["horizon"])
        actions = client.infer({"instruction": "Insert the needle.",
                                "images": [jpeg_bytes_view1, rgb_uint8_view5],
                                "sensor": window})           # (T, C) float, optional
        # actions: (H, A) float32, robot units and degrees (metadata["action_units"])

Observations are checked against the server's metadata before they are sent (the same check the
server makes), so a wrong shape fails here, in one line, without a round trip.
"""
from __future__ import annotations

import contextlib
import itertools

import numpy as np

from vla_ds.serve.protocol import PROTOCOL_VERSION, ProtocolError, check_observation, pack, unpack


class PolicyError(RuntimeError):
    """The server answered a request with an error: `field` names what was wrong."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


class PolicyClient:
    """One connection to a policy server; `infer` is blocking and thread-safe only per instance
    (use one client per thread)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 timeout: float = 30.0, check: bool = True):
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        # entered as a context (websockets >= 17.1 deprecates a bare connect()), left in close()
        self._stack = contextlib.ExitStack()
        self._ws = self._stack.enter_context(connect(f"ws://{host}:{port}", additional_headers=headers,
                                                     open_timeout=timeout, close_timeout=5, max_size=None,
                                                     compression=None))
        self.timeout, self.check = timeout, check
        self.metadata = self._recv()
        if self.metadata.get("type") != "metadata" or self.metadata.get("protocol") != PROTOCOL_VERSION:
            self.close()
            raise ConnectionError(f"ws://{host}:{port} is not a vla-ds policy server of protocol {PROTOCOL_VERSION} "
                                  f"(first message {str(self.metadata)[:100]})")
        self._ids = itertools.count()

    def _recv(self) -> dict:
        return unpack(self._ws.recv(timeout=self.timeout))

    def request(self, observation: dict) -> dict:
        """The server's whole reply to one observation: actions, server_ms, policy_step, request."""
        if self.check:
            try:
                check_observation(observation, self.metadata)
            except ProtocolError as e:
                raise PolicyError(e.field, str(e)) from None
        request_id = next(self._ids)
        payload = pack({"type": "infer", "id": request_id, "observation": observation})
        limit = self.metadata["max_message_bytes"]
        if len(payload) > limit:
            raise PolicyError("message", f"message: {len(payload)} bytes, over the server's limit of {limit} "
                                         "(send JPEG bytes instead of arrays, or a shorter sensor window)")
        self._ws.send(payload)
        reply = self._recv()
        if reply.get("id") != request_id:
            raise ConnectionError(f"reply for request {reply.get('id')!r} while waiting for {request_id}")
        if reply.get("type") == "error":
            raise PolicyError(reply.get("field"), reply.get("error", "error"))
        return reply

    def infer(self, observation: dict) -> np.ndarray:
        """Observation -> the denormalized action chunk (H, A) float32."""
        return np.array(self.request(observation)["actions"])  # writable (the wire array is read-only)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
