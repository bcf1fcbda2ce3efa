"""The batch format across processes: what a 2-worker DataLoader hands over equals the batch made
in the main process, small tensors travel by value and the sensor windows through shared memory."""
from __future__ import annotations

import pickle

import torch

from vla_ds.data.batch import SMALL_BYTES, collate
from vla_ds.data.dataset import IntegratedDataset
from vla_ds.data.ingest import IngestOptions, preprocess


def _same(a, b, key) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), key
    elif isinstance(a, list):
        assert len(a) == len(b), key
        for x, y in zip(a, b):
            _same(x, y, key)
    else:
        assert a == b, key


def test_worker_batches_equal_main_process_batches(exact_session_a, exact_session_b, tmp_path):
    preprocess([str(exact_session_a.parent.parent)], tmp_path / "ds", IngestOptions())
    ds = IntegratedDataset(tmp_path / "ds")
    want = [collate([ds[i] for i in range(k, min(k + 3, len(ds)))]) for k in range(0, len(ds), 3)]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate)
    got = list(loader)
    assert len(got) == len(want) and any("sensor" in b for b in got) and any("sensor" not in b for b in got)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            _same(g[k], w[k], k)
    # every view of a batch has one size: from a worker, one stacked tensor, each sample's views slices of it
    views = got[0]["images"]
    assert len(views[0]) == 2 and views[0][0].dtype == torch.uint8 and views[0][0].shape[2] == 3
    assert len({v.untyped_storage().data_ptr() for s in views for v in s}) == 1
    sensed = next(b for b in want if "sensor" in b)
    assert sensed["sensor"].dtype == torch.float16  # as stored: half the bytes of float32
    # by value: every tensor under SMALL_BYTES; the (n, 650, 1026) windows go through shared memory
    _, (items, by_value) = sensed.__reduce__()
    assert "actions" in by_value and "sensor_rows" in by_value and "sensor" not in by_value
    assert sensed["sensor"].numel() * 2 > SMALL_BYTES
    assert torch.equal(pickle.loads(pickle.dumps(sensed))["actions"], sensed["actions"])
    # pinned for a CUDA copy: the tensors that go to the device, not the images (they stay on the CPU)
    if torch.cuda.is_available():
        pinned = sensed.pin_memory()
        assert pinned["sensor"].is_pinned() and not pinned["images"][0][0].is_pinned()
