"""--resume picks the newest checkpoint that checks whole against its manifest, names what it
skipped, and never touches the damaged one (the full kill -> damage -> resume run is in
test_checkpoint.py)."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest

from vla_ds.errors import UsageError
from vla_ds.train.checkpoint import resolve_resume
from vla_ds.utils import integrity

pytestmark = pytest.mark.slow
STEP = "step_000002"


def _two_steps(zero2_run, tmp_path):
    """A copy of the session's 2-process run with an intact earlier step beside its latest."""
    out = tmp_path / "run"
    shutil.copytree(zero2_run, out, symlinks=True)
    root = out / "checkpoints"
    shutil.copytree(root / STEP, root / "step_000001")
    return out, root / STEP, root / "step_000001"


def _snapshot(d):
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_the_manifest_records_every_file_of_a_saved_checkpoint(zero2_run):
    step = zero2_run / "checkpoints" / STEP
    recorded = json.loads((step / integrity.MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()} - {integrity.MANIFEST}
    assert set(recorded) == on_disk and f"ds/{STEP}/mp_rank_00_model_states.pt" in recorded
    assert all(recorded[rel] == (step / rel).stat().st_size for rel in recorded)
    assert integrity.check(step) is None


@pytest.mark.parametrize("file, damage, why", [
    ("rng/rank_00001.safetensors", "truncate", "bytes, {} when it was saved"),
    (f"ds/{STEP}/zero_pp_rank_1_mp_rank_00_optim_states.pt", "truncate", "bytes, {} when it was saved"),
    ("trainer_state.json", "truncate", "bytes, {} when it was saved"),
    ("policy/model.safetensors", "delete", "is missing"),
])
def test_auto_resume_skips_a_damaged_latest_and_leaves_it(zero2_run, tmp_path, caplog, file, damage, why):
    out, latest, older = _two_steps(zero2_run, tmp_path)
    path = latest / file
    size = path.stat().st_size
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: size // 2])
    else:
        path.unlink()
    before = _snapshot(latest)
    with caplog.at_level(logging.WARNING, logger="vla_ds"):
        assert resolve_resume("auto", out) == older.resolve()
    notices = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(notices) == 1 and STEP in notices[0] and file in notices[0] and why.format(size) in notices[0], notices
    assert "\n" not in notices[0]
    assert _snapshot(latest) == before and latest.is_dir(), "the damaged checkpoint is left as it was"


def test_an_older_checkpoint_without_a_manifest_is_checked_by_structure(zero2_run, tmp_path):
    out, latest, older = _two_steps(zero2_run, tmp_path)
    for d in (latest, older):
        (d / integrity.MANIFEST).unlink()  # written by a vla-ds before the manifest
    assert resolve_resume("auto", out) == latest.resolve()
    shard = latest / "ds" / STEP / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:-200])  # the zip's central directory is at its end
    assert "mp_rank_00_model_states.pt is unreadable" in integrity.check(latest)
    rng = older / "rng" / "rank_00000.safetensors"
    rng.write_bytes(rng.read_bytes()[:-3])
    assert "rank_00000.safetensors is truncated" in integrity.check(older)


def test_only_damaged_checkpoints_or_a_damaged_named_one_are_refused_in_one_line(zero2_run, tmp_path):
    out, latest, older = _two_steps(zero2_run, tmp_path)
    (latest / "rng" / "rank_00000.json").write_text("{")
    with pytest.raises(UsageError) as e:  # the user named this one: it is never swapped for another
        resolve_resume(str(latest), out)
    assert str(latest) in str(e.value) and "rng/rank_00000.json" in str(e.value) and "\n" not in str(e.value)
    (older / "policy" / "config.json").unlink()
    with pytest.raises(UsageError) as e:
        resolve_resume("auto", out)
    msg = str(e.value)
    assert "every checkpoint" in msg and STEP in msg and "step_000001 (policy/config.json is missing)" in msg
    assert "--resume none" in msg and "\n" not in msg
    assert resolve_resume("auto", tmp_path / "fresh") is None, "no checkpoints at all: a fresh start"


def test_auto_takes_latest_not_an_abandoned_newer_step_and_orders_steps_by_number(zero2_run, tmp_path):
    from vla_ds.train.checkpoint import set_pointer

    out, latest, older = _two_steps(zero2_run, tmp_path)
    root = out / "checkpoints"
    # a run resumed from step 2 left the step 3 of the timeline it abandoned: not a candidate
    shutil.copytree(latest, root / "step_000003")
    assert resolve_resume("auto", out) == latest.resolve()
    # past six digits: step_1000000 is newer than step_999999 (by name it sorts before)
    for name in ("step_999999", "step_1000000"):
        shutil.copytree(latest, root / name)
    set_pointer(root, "latest", "step_1000000")
    assert resolve_resume("auto", out) == (root / "step_1000000").resolve()


def test_a_safetensors_header_of_the_wrong_shape_is_damage_not_a_traceback(tmp_path):
    import struct

    header = json.dumps([1, 2]).encode()  # valid JSON, not a {name: {dtype, shape, data_offsets}} map
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert "w.safetensors is unreadable" in integrity.check(tmp_path)
