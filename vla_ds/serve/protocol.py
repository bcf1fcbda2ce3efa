"""The wire format between `vla-ds serve` and `PolicyClient`: msgpack maps over binary websocket
frames, numpy arrays as raw bytes. numpy and msgpack only (no torch): the robot side imports this.

Why msgpack: it is compact and binary (an array travels as its bytes, no base64), has readers in
every language a robot stack is written in (C++, Python, Rust), and is what openpi's policy server
speaks. An array is the map {"__nd__": 1, "dtype": "<f4", "shape": [T, C], "data": bytes}; only plain
numeric dtypes are accepted (never object arrays: nothing is unpickled).

Messages:

    server -> client, on connect    {"type": "metadata", ...}                    (`metadata` below)
    client -> server                {"type": "infer", "id": any, "observation": {...}}
    server -> client                {"type": "result", "id": ..., "actions": (H, A) float32,
                                     "server_ms": float, "policy_step": int | None, "request": int}
                                    {"type": "error", "id": ... | None, "field": "observation.images[1]",
                                     "error": "one line naming the field and what is expected"}

An observation: "instruction" (str), "images" (one per view, in the metadata's order: JPEG/PNG
bytes or a uint8 (H, W, 3) array), optionally "sensor" (a raw (T, C) window, newest row last; the
most recent `sensor_length` rows are used), "state" ({"pose": (6,), "joints": (6,) or None}) when
the policy reads the robot state, and "seed" (int: a flow head's draws).
"""
from __future__ import annotations

import math

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
# dtypes an array may have on the wire: numbers and bools, little-endian, never objects
WIRE_DTYPES = {"|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8", "|b1"}
OBSERVATION_FIELDS = ("instruction", "images", "sensor", "state", "seed")
MESSAGE_FIELDS = ("type", "id", "observation")
STATE_SHAPE = (6,)


class ProtocolError(ValueError):
    """A message that cannot be answered: `field` names where it is wrong, the text what is expected."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _default(obj):
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        if arr.dtype.byteorder == ">":  # the wire is little-endian
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype.str not in WIRE_DTYPES:
            raise TypeError(f"cannot send an array of dtype {obj.dtype}: numbers and bools only")
        return {"__nd__": 1, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__}")


def _object_hook(obj: dict):
    if obj.get("__nd__") != 1:
        return obj
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype not in WIRE_DTYPES or not isinstance(shape, list) or not isinstance(data, bytes) \
            or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError("array", f"malformed array (dtype {dtype!r}, shape {shape!r}); dtypes allowed: "
                                     f"{', '.join(sorted(WIRE_DTYPES))}")
    dt = np.dtype(dtype)
    if math.prod(shape) * dt.itemsize != len(data):
        raise ProtocolError("array", f"{len(data)} bytes of data for shape {shape} of {dtype}")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def pack(message: dict) -> bytes:
    return msgpack.packb(message, default=_default, use_bin_type=True)


def unpack(frame) -> dict:
    """A received frame -> its map; anything else is a `ProtocolError` naming "message"."""
    if isinstance(frame, str):
        raise ProtocolError("message", "a text frame; send binary msgpack (PolicyClient does)")
    try:
        out = msgpack.unpackb(frame, object_hook=_object_hook, raw=False, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack's own errors: truncated, extra data, bad utf-8, ...
        raise ProtocolError("message", f"not a msgpack map ({type(e).__name__}: {str(e)[:80]}); truncated?") \
            from None
    if not isinstance(out, dict):
        raise ProtocolError("message", f"a msgpack {type(out).__name__}, expected a map")
    return out


def _finite_array(value, field: str, shape: tuple, what: str) -> np.ndarray:
    """`value` as float32 of `shape` (None in it: any size), finite; else a ProtocolError."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
        raise ProtocolError(field, f"expected a numeric array {what}, got {type(value).__name__}")
    if value.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, value.shape)):
        raise ProtocolError(field, f"shape {tuple(value.shape)}, expected {what}")
    out = value.astype(np.float32)
    if not np.isfinite(out).all():
        raise ProtocolError(field, f"holds NaN/inf in {int((~np.isfinite(out)).sum())} value(s); send finite values "
                                   "(omit the field if there is no reading)")
    return out


def _image(value, field: str):
    if isinstance(value, (bytes, bytearray)):
        if len(value) == 0:
            raise ProtocolError(field, "empty bytes; expected JPEG/PNG bytes or a uint8 (H, W, 3) array")
        return bytes(value)
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3 or min(value.shape[:2]) < 1:
            raise ProtocolError(field, f"array {value.dtype} {tuple(value.shape)}, expected uint8 (H, W, 3) RGB")
        return value
    raise ProtocolError(field, f"a {type(value).__name__}, expected JPEG/PNG bytes or a uint8 (H, W, 3) array")


def check_observation(obs, meta: dict) -> dict:
    """The observation map checked against the server's `metadata`: every field's type and shape,
    no unknown field, finite numbers. Returns it with arrays as float32 (images untouched; bytes are
    decoded by the server). The first problem is a `ProtocolError` naming the field."""
    if not isinstance(obs, dict):
        raise ProtocolError("observation", f"a {type(obs).__name__}, expected a map of {', '.join(OBSERVATION_FIELDS)}")
    unknown = sorted(str(k) for k in obs if k not in OBSERVATION_FIELDS)
    if unknown:
        raise ProtocolError(f"observation.{unknown[0]}", f"unknown field; the fields are {', '.join(OBSERVATION_FIELDS)}")
    out: dict = {}
    text = obs.get("instruction")
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError("observation.instruction", "missing or not a non-empty string")
    out["instruction"] = text
    images, views = obs.get("images"), meta["views"]
    if not isinstance(images, list) or len(images) != len(views):
        got = f"{len(images)} image(s)" if isinstance(images, list) else f"a {type(images).__name__}"
        raise ProtocolError("observation.images", f"{got}, expected a list of {len(views)}: {', '.join(views)}, in "
                                                  "that order")
    out["images"] = [_image(v, f"observation.images[{i}] ({views[i]})") for i, v in enumerate(images)]
    if obs.get("sensor") is not None:
        channels = meta["sensor_channels"]
        if channels is None:
            raise ProtocolError("observation.sensor", "this policy reads no sensor; omit the field")
        sensor = _finite_array(obs["sensor"], "observation.sensor", (None, channels),
                               f"(T, {channels}) with T >= 1 (newest row last)")
        if sensor.shape[0] < 1:
            raise ProtocolError("observation.sensor", "0 rows; omit the field when there is no reading")
        out["sensor"] = sensor
    if meta["state_keys"]:
        state = obs.get("state")
        if not isinstance(state, dict):
            raise ProtocolError("observation.state", f"missing; this policy reads the robot state: {{'pose': (6,), "
                                                     f"'joints': (6,) or None}} (keys {', '.join(meta['state_keys'])})")
        extra = sorted(str(k) for k in state if k not in ("pose", "joints"))
        if extra:
            raise ProtocolError(f"observation.state.{extra[0]}", "unknown field; the fields are pose, joints")
        out["state"] = {"pose": _finite_array(state.get("pose"), "observation.state.pose", STATE_SHAPE, "(6,)"),
                        "joints": None if state.get("joints") is None else
                        _finite_array(state["joints"], "observation.state.joints", STATE_SHAPE, "(6,) or None")}
    elif obs.get("state") is not None:
        raise ProtocolError("observation.state", "this policy reads no robot state; omit the field")
    seed = obs.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ProtocolError("observation.seed", f"{seed!r}, expected an int in [0, 2**63)")
    out["seed"] = seed
    return out


def check_request(message: dict) -> tuple[object, dict]:
    """(id, observation map) of an "infer" message, or a ProtocolError."""
    unknown = sorted(str(k) for k in message if k not in MESSAGE_FIELDS)
    if unknown:
        raise ProtocolError(unknown[0], f"unknown field; a request has {', '.join(MESSAGE_FIELDS)}")
    if message.get("type") != "infer":
        raise ProtocolError("type", f"{message.get('type')!r}, expected 'infer'")
    return message.get("id"), message.get("observation")


def error_reply(request_id, err: ProtocolError) -> dict:
    return {"type": "error", "id": request_id, "field": err.field, "error": str(err)}
