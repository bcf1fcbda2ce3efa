"""Serving a policy to the robot: `vla-ds serve` (`server.PolicyServer`), the robot side's
`PolicyClient` and `ChunkExecutor` (numpy, msgpack and websockets only: importing them, or this
package, never imports torch), and the wire format (`protocol`). docs/serving.md."""
from vla_ds.serve.client import PolicyClient, PolicyError
from vla_ds.serve.executor import ChunkBlender, ChunkExecutor, ExecutorStats

__all__ = ["PolicyClient", "PolicyError", "ChunkExecutor", "ChunkBlender", "ExecutorStats"]
