"""Progress bars on rank 0 only (other ranks stay quiet), to stderr, never in the way of logs."""
from __future__ import annotations

from vla_ds.utils.logging import rank


def progress(total: int | None = None, desc: str = "", unit: str = "it", **kwargs):
    """A tqdm bar on rank 0; a disabled one elsewhere (same API, prints nothing)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=rank() != 0, dynamic_ncols=True, mininterval=1.0, **kwargs)
