"""`vla-ds serve POLICY`: a websocket server that loads a policy once and answers observations with
action chunks (the wire format: `vla_ds.serve.protocol`).

Features:
- on connect, the policy's metadata (views, sensor shape, state keys, horizon, action units, head,
  vla-ds version, the message size limit) so a client checks before its first request;
- concurrent clients; their requests are batched (`max_batch`; a batch takes what is queued when
  the model frees up, and waits up to `max_wait_ms` for more), each reply matched to its request by id;
  a flow head draws each request's noise from its own seed, so batching never changes an answer;
- binds to 127.0.0.1 unless told otherwise; with a token, a connection without
  "Authorization: Bearer TOKEN" is refused in the HTTP handshake, before any model work;
- bad input never takes it down: a malformed, truncated or wrong-shaped message, NaN, an
  undecodable JPEG or an unknown field gets an error reply naming the field and what is expected
  (`protocol.check_observation`), a message over the size limit closes that connection (1009), and
  the server goes on serving everyone else.

The model runs on one worker thread (the event loop keeps accepting and checking messages while it
computes); sensor windows are laid out exactly as training reads them (`window_rows`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import io
import json
import logging
import threading
import time
from http import HTTPStatus
from pathlib import Path

import numpy as np

from vla_ds.serve.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    check_observation,
    check_request,
    error_reply,
    pack,
    unpack,
)

log = logging.getLogger(__name__)

# what each action dim is (docs/data.md): pose deltas per step, then the episode progress
ACTION_UNITS = ["robot units", "robot units", "robot units", "degrees", "degrees", "degrees", "progress (0-1)"]
ACTION_NAMES = ["dx", "dy", "dz", "da", "db", "dr", "progress"]


def policy_step(policy_dir: Path) -> int | None:
    """The training step a policy directory was saved at (its step's trainer_state.json, or the
    convert.json of a converted one), if known."""
    for f, key in ((policy_dir.parent / "trainer_state.json", "step"), (policy_dir.parent / "convert.json", "step")):
        try:
            return int(json.loads(f.read_text())[key])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def metadata(policy, max_message_bytes: int, max_batch: int, step: int | None) -> dict:
    """What a client learns on connect (and checks its observations against)."""
    from vla_ds import __version__

    cfg = policy.config
    dims = cfg.action_dim
    return {"type": "metadata", "protocol": PROTOCOL_VERSION, "vla_ds_version": __version__,
            "views": list(policy.views or []), "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels,
            "sensor_channels": cfg.sensor_input_channels if policy.sensor_encoder is not None else None,
            "sensor_length": cfg.sensor_temporal_length if policy.sensor_encoder is not None else None,
            "state_keys": list(cfg.state_key_names()) if policy.state_encoder is not None else [],
            "horizon": cfg.horizon, "action_dim": dims,
            "action_names": ACTION_NAMES if dims == len(ACTION_NAMES) else [f"a{i}" for i in range(dims)],
            "action_units": ACTION_UNITS if dims == len(ACTION_UNITS) else ["?"] * dims,
            "action_head": cfg.action_head, "policy_step": step, "max_message_bytes": max_message_bytes,
            "max_batch": max_batch}


def window_rows(window: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """A raw (T, C) window -> ((length, C), valid rows (length,)) as the dataset lays one out: the
    most recent `length` rows first, zero padding after them."""
    rows = window[-length:]
    out = np.zeros((length, window.shape[1]), np.float32)
    out[:len(rows)] = rows
    mask = np.zeros(length, bool)
    mask[:len(rows)] = True
    return out, mask


def decode_image(value, field: str) -> np.ndarray:
    """JPEG/PNG bytes or a uint8 array -> a uint8 (H, W, 3) array; undecodable bytes: ProtocolError."""
    if isinstance(value, np.ndarray):
        return value
    from PIL import Image

    try:
        with Image.open(io.BytesIO(value)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError on truncation, bombs)
        raise ProtocolError(field, f"not a decodable image ({type(e).__name__}); send JPEG/PNG bytes or a uint8 "
                                   "(H, W, 3) array") from None


def new_model_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread the policy runs on. Load the policy on it too (`serve_policy` does): each thread
    that runs torch ops gets an OpenMP team of its own, and two teams on the same cores slowed every
    forward pass by ~40 % here (2 cores, the tiny backbone)."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vla-ds-serve-model")


class PolicyServer:
    """Serve `policy` (a `QwenVLA`) on host:port; see the module docstring. `serve_forever` in an
    event loop, or `start()` / `stop()` on a thread of its own (tests, benchmarks, notebooks)."""

    def __init__(self, policy, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 max_batch: int = 8, max_wait_ms: float = 0.0, max_message_bytes: int = 32 << 20,
                 step: int | None = None, model_thread: concurrent.futures.ThreadPoolExecutor | None = None):
        if max_batch < 1 or max_wait_ms < 0 or max_message_bytes < 1024:
            raise ValueError(f"max_batch={max_batch} (>= 1), max_wait_ms={max_wait_ms} (>= 0), "
                             f"max_message_bytes={max_message_bytes} (>= 1024)")
        self.policy, self.host, self.port, self.token = policy, host, port, token
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.max_message_bytes = max_message_bytes
        self.meta = metadata(policy, max_message_bytes, max_batch, step)
        self.stats = {"requests": 0, "errors": 0, "batches": 0, "largest_batch": 0, "refused": 0}
        self._pool = model_thread or new_model_thread()
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------- the model
    def _predict(self, obs: list[dict]) -> list[np.ndarray]:
        """One batch of checked observations (images decoded) -> (H, A) float32 chunks."""
        import torch

        sensed = [o for o in obs if "sensor" in o]
        sensor = mask = None
        if sensed and self.policy.sensor_encoder is not None:
            length = self.meta["sensor_length"]
            laid = [window_rows(o["sensor"], length) if "sensor" in o else
                    (np.zeros((length, self.meta["sensor_channels"]), np.float32), np.zeros(length, bool)) for o in obs]
            sensor = torch.from_numpy(np.stack([w for w, _ in laid]))
            mask = torch.from_numpy(np.stack([m for _, m in laid]))
        state = None
        if self.meta["state_keys"]:
            joints = [o["state"]["joints"] for o in obs]
            state = {"pose": np.stack([o["state"]["pose"] for o in obs]),
                     "joints": None if joints[0] is None else np.stack(joints)}
        with torch.no_grad():
            out = self.policy.predict([o["instruction"] for o in obs], [o["images"] for o in obs], sensor_data=sensor,
                                      sensor_mask=mask, state=state, seed=[o["seed"] for o in obs])
        return [a.numpy().astype(np.float32) for a in out]

    def run_batch(self, batch: list[dict]) -> list[dict]:
        """Replies for a batch of checked observations, in order: a result or an error each, never a
        raise (runs on the model thread)."""
        from vla_ds.errors import UsageError

        replies: list[dict | None] = [None] * len(batch)
        ready = []
        for i, obs in enumerate(batch):
            try:
                obs["images"] = [decode_image(v, f"observation.images[{j}] ({self.meta['views'][j]})")
                                 for j, v in enumerate(obs["images"])]
                ready.append(i)
            except ProtocolError as e:
                replies[i] = error_reply(None, e)
        groups: dict[bool, list[int]] = {}  # joints given or not: predict takes one or the other per batch
        for i in ready:
            groups.setdefault(bool(self.meta["state_keys"]) and batch[i]["state"]["joints"] is not None, []).append(i)
        for idx in groups.values():
            try:
                for i, actions in zip(idx, self._predict([batch[i] for i in idx])):
                    replies[i] = {"type": "result", "actions": actions}
            except (UsageError, ValueError) as e:
                reply = error_reply(None, ProtocolError("observation", str(e).splitlines()[0]))
                for i in idx:
                    replies[i] = dict(reply)
            except Exception as e:  # a fault in the model (non-finite output, OOM): this batch fails, not the server
                log.exception("serve: the policy failed on a batch of %d", len(idx))
                for i in idx:
                    replies[i] = {"type": "error", "id": None, "field": "policy",
                                  "error": f"policy: the model failed ({type(e).__name__}: {str(e)[:200]})"}
        return replies

    # ---------------------------------------------------------------------------------- the loop
    async def _batcher(self):
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                try:
                    items.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
            try:
                replies = await loop.run_in_executor(self._pool, self.run_batch, [obs for obs, _ in items])
            except Exception as e:  # run_batch never raises; this is the executor itself failing
                replies = [{"type": "error", "id": None, "field": "server", "error": f"server: {e}"}] * len(items)
            for (_, fut), reply in zip(items, replies):
                if not fut.done():
                    fut.set_result(reply)

    async def _handle(self, ws):
        peer = getattr(ws, "remote_address", None)
        log.info("serve: client %s connected", peer)
        await ws.send(pack(self.meta))
        async for frame in ws:
            t0 = time.perf_counter()
            request_id = None
            try:
                message = unpack(frame)
                request_id = message.get("id")
                request_id, obs = check_request(message)
                obs = check_observation(obs, self.meta)
            except ProtocolError as e:
                self.stats["errors"] += 1
                log.warning("serve: refused a request from %s: %s", peer, e)
                await ws.send(pack(error_reply(request_id, e)))  # an id that was unpacked packs again
                continue
            fut = asyncio.get_running_loop().create_future()
            await self._queue.put((obs, fut))
            reply = dict(await fut, id=request_id)
            if reply["type"] == "result":
                self.stats["requests"] += 1
                reply.update(server_ms=(time.perf_counter() - t0) * 1000.0, policy_step=self.meta["policy_step"],
                             request=self.stats["requests"])
            else:
                self.stats["errors"] += 1
            await ws.send(pack(reply))
        log.info("serve: client %s disconnected", peer)

    def _check_token(self, connection, request):
        """websockets' process_request: refuse the handshake without the token (no model work done)."""
        if self.token is None:
            return None
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return None
        self.stats["refused"] += 1
        log.warning("serve: refused a connection without the token from %s", getattr(connection, "remote_address", "?"))
        return connection.respond(HTTPStatus.UNAUTHORIZED, "vla-ds serve: a valid token is required "
                                                           "(Authorization: Bearer TOKEN)\n")

    async def serve_forever(self, ready=None) -> None:
        """Serve until `stop()`; `ready(port)` is called once listening (port 0 picks a free one)."""
        from websockets.asyncio.server import serve

        self._loop, self._queue, self._stopped = asyncio.get_running_loop(), asyncio.Queue(), asyncio.Event()
        batcher = asyncio.create_task(self._batcher())
        async with serve(self._handle, self.host, self.port, process_request=self._check_token,
                         max_size=self.max_message_bytes, compression=None) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            log.info("serving %s on ws://%s:%d (batches up to %d, %s)", "policy", self.host, self.port, self.max_batch,
                     "token required" if self.token else "no token")
            if ready is not None:
                ready(self.port)
            await self._stopped.wait()
        batcher.cancel()

    def start(self, timeout: float = 60.0) -> int:
        """Serve on a daemon thread; returns the port once listening."""
        started = threading.Event()

        def run():
            asyncio.run(self.serve_forever(ready=lambda _: started.set()))

        self._thread = threading.Thread(target=run, name="vla-ds-serve", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise RuntimeError(f"vla-ds serve did not start listening on {self.host}:{self.port} in {timeout:.0f} s")
        return self.port

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(30)
        self._pool.shutdown(wait=False)


def serve_policy(spec: str, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 device: str | None = None, backbone: str | None = None, **options) -> None:
    """`vla-ds serve`: locate the policy (a policy directory, a checkpoint or a run: as `vla-ds eval`
    finds it), load it once on `device` (CUDA when there is one) and serve until interrupted."""
    import torch

    from vla_ds.errors import UsageError
    from vla_ds.eval.locate import locate
    from vla_ds.model.policy import QwenVLA

    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here; use --device cpu")
    if not 0 <= port < 65536:
        raise UsageError(f"--port {port}: give 0..65535 (0: any free port)")
    found = locate(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_thread = new_model_thread()
    policy = model_thread.submit(QwenVLA.from_pretrained, found.policy_dir, backbone=backbone, device=device).result()
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning("serving on %s without --token: anyone who can reach this port can drive the policy", host)
    server = PolicyServer(policy, host=host, port=port, token=token, step=policy_step(found.policy_dir),
                          model_thread=model_thread, **options)
    log.info("policy %s (%s), %s head, views %s, on %s", found.policy_dir, found.checkpoint, policy.config.action_head,
             ", ".join(server.meta["views"]), device)
    try:
        asyncio.run(server.serve_forever())
    except OSError as e:  # the port is taken, the host is not ours
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); pick another "
                         "--port (0: any free one)") from None
