"""`vla-ds serve POLICY`: a websocket policy server for the robot (vla_ds.serve; docs/serving.md)."""
from __future__ import annotations

import argparse
import os

from vla_ds.cli.common import subcommand

TOKEN_ENV = "VLA_DS_SERVE_TOKEN"


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run, help="serve a policy over websockets: observation -> action chunk",
                   description="Load a policy once and answer observations (images, instruction, optional sensor "
                               "window and robot state; msgpack over websockets) with denormalized action chunks. "
                               "POLICY: a policy directory, a checkpoint (RUN/checkpoints/best) or a run directory. "
                               "The robot side: vla_ds.serve.PolicyClient and ChunkExecutor. See docs/serving.md.")
    p.add_argument("policy", metavar="POLICY", help="policy directory, checkpoint or run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; then "
                   "give --token)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free one, logged)")
    p.add_argument("--token", default=None,
                   help=f"clients must send 'Authorization: Bearer TOKEN'; unset: ${TOKEN_ENV} if set (which keeps "
                   "the token out of the process list), else no token")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="where the policy runs (unset: cuda when available, else cpu)")
    p.add_argument("--backbone", default=argparse.SUPPRESS, metavar="PATH",
                   help="backbone directory, if it moved since training (unset: the one in the policy config)")
    p.add_argument("--max-batch", type=int, default=8, help="most concurrent requests answered in one forward pass")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long a batch waits for more requests once the model is free (0: it takes what is "
                   "queued, adding no latency)")
    p.add_argument("--max-message-mb", type=float, default=32.0,
                   help="largest request accepted; a larger one closes its connection (code 1009)")


def run(args: argparse.Namespace) -> int:
    from vla_ds.errors import UsageError
    from vla_ds.serve.server import serve_policy

    if args.max_batch < 1 or args.max_wait_ms < 0 or args.max_message_mb <= 0:
        raise UsageError(f"--max-batch {args.max_batch} (>= 1), --max-wait-ms {args.max_wait_ms} (>= 0), "
                         f"--max-message-mb {args.max_message_mb} (> 0): out of range")
    serve_policy(args.policy, host=args.host, port=args.port, token=args.token or os.environ.get(TOKEN_ENV) or None, device=args.device,
                 backbone=getattr(args, "backbone", None), max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                 max_message_bytes=max(1024, int(args.max_message_mb * 2**20)))
    return 0
