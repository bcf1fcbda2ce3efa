"""Open-loop metrics of predicted action chunks, in the dataset's physical units (pure numpy).

An action chunk is (H, 7): per step k the pose change dx, dy, dz (robot units), da, db, dr
(degrees, wrapped) and the episode progress reached (0..1); see `vla_ds.data.dataset`. Given
predictions and recorded chunks of N samples with their valid-step masks:

- `dim_step_errors`: MAE and RMSE per action dim and horizon step (H, 7);
- `summary`: the headline numbers of a set of samples (`SUMMARY_KEYS`, defined in docs/evaluation.md):
  per-step position / angle / progress MAE, the position and angle error of the chunk *integrated*
  over its valid steps (how far off the tool is after H steps), and the share of (sample, step) pairs
  whose integrated position error is within `tol`;
- the same for the two yardsticks (`baselines`): zero motion, and the training set's mean chunk.
"""
from __future__ import annotations

import numpy as np

DIM_NAMES = ("dx", "dy", "dz", "da", "db", "dr", "progress")
DIM_UNITS = ("units", "units", "units", "deg", "deg", "deg", "")
POS, ANG, PROGRESS = slice(0, 3), slice(3, 6), 6
SUMMARY_KEYS = ("pos_mae", "ang_mae", "progress_mae", "final_pos_err", "final_ang_err", "within_tol")


def _check(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> None:
    if pred.shape != target.shape or pred.ndim != 3 or pred.shape[2] != len(DIM_NAMES):
        raise ValueError(f"predictions {pred.shape} and targets {target.shape} must both be (N, H, {len(DIM_NAMES)})")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask {mask.shape} must be (N, H) = {pred.shape[:2]}")


def integrated(err: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, H) Euclidean norm of the step errors `err` (N, H, d) summed over the valid steps up to each
    step: where the tool would be off after k steps of the chunk, had it followed the prediction."""
    return np.linalg.norm(np.cumsum(err * mask[..., None], axis=1), axis=2)


def final_errors(err: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(n,) integrated error norm at each sample's last valid step (samples without one left out)."""
    last = np.maximum(mask.sum(axis=1) - 1, 0)
    return integrated(err, mask)[np.arange(len(err)), last][mask.any(axis=1)]


def dim_step_errors(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """{"mae": (H, A), "rmse": (H, A), "count": (H,)} over the valid (sample, step) pairs; NaN where a
    step has no valid pair."""
    _check(pred, target, mask)
    err = (pred - target) * mask[..., None]
    count = mask.sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mae = np.abs(err).sum(axis=0) / count[:, None]
        rmse = np.sqrt((err ** 2).sum(axis=0) / count[:, None])
    return {"mae": mae, "rmse": rmse, "count": count}


def summary(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, tol: float) -> dict[str, float]:
    """The `SUMMARY_KEYS` of N samples (plus "samples"); NaN for an empty set."""
    _check(pred, target, mask)
    n_valid = float(mask.sum())
    out = {"samples": int(len(pred))}
    if n_valid == 0:
        return {**out, **{k: float("nan") for k in SUMMARY_KEYS}}
    err = pred - target
    abs_err = np.abs(err) * mask[..., None]
    out.update(
        pos_mae=float(abs_err[..., POS].sum() / (3 * n_valid)),
        ang_mae=float(abs_err[..., ANG].sum() / (3 * n_valid)),
        progress_mae=float(abs_err[..., PROGRESS].sum() / n_valid),
        final_pos_err=float(final_errors(err[..., POS], mask).mean()),
        final_ang_err=float(final_errors(err[..., ANG], mask).mean()),
        within_tol=float(((integrated(err[..., POS], mask) <= tol) & mask).sum() / n_valid),
    )
    return out


def baselines(target: np.ndarray, mean_chunk: np.ndarray) -> dict[str, np.ndarray]:
    """The yardsticks' predictions for N samples: "zero_motion" (no pose change, progress 0) and
    "mean_chunk" (the training set's mean chunk (H, A), for every sample)."""
    return {"zero_motion": np.zeros_like(target), "mean_chunk": np.broadcast_to(mean_chunk, target.shape)}


def mean_chunk(chunks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, A) mean of the valid steps of `chunks` (N, H, A) at each horizon step (0 where none)."""
    count = mask.sum(axis=0)[:, None]
    return np.where(count > 0, (chunks * mask[..., None]).sum(axis=0) / np.maximum(count, 1), 0.0)


def scored(pred, target, mask, chunk: np.ndarray, tol: float) -> dict[str, dict]:
    """Summary of the policy and of each yardstick on the same samples."""
    out = {"policy": summary(pred, target, mask, tol)}
    for name, base in baselines(target, chunk).items():
        out[name] = summary(base, target, mask, tol)
    return out


def score(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, has_sensor: np.ndarray, episode_ids: list[str],
          chunk: np.ndarray, tol: float) -> dict:
    """Every figure of an evaluation (the layout of eval.json's metrics; docs/evaluation.md)."""
    has_sensor = np.asarray(has_sensor, bool)
    episodes = np.asarray(episode_ids)
    per_dim = {"policy": dim_step_errors(pred, target, mask)}
    for name, base in baselines(target, chunk).items():
        per_dim[name] = dim_step_errors(base, target, mask)
    by_sensor = {}
    for name, sel in (("sensor", has_sensor), ("no_sensor", ~has_sensor)):
        if sel.any():
            by_sensor[name] = scored(pred[sel], target[sel], mask[sel], chunk, tol)
    per_episode = {}
    for ep in dict.fromkeys(episode_ids):  # first-seen order (samples are sorted by id)
        sel = episodes == ep
        per_episode[ep] = {"has_sensor": bool(has_sensor[sel].any()), **scored(pred[sel], target[sel], mask[sel],
                                                                                chunk, tol)}
    pos_by_step = {name: _integrated_by_step(p, target, mask)
                   for name, p in {"policy": pred, **baselines(target, chunk)}.items()}
    return {
        "summary": scored(pred, target, mask, chunk, tol),
        "by_sensor": by_sensor,
        "per_episode": per_episode,
        "per_dim_step": {k: {m: v[m].tolist() for m in ("mae", "rmse")} for k, v in per_dim.items()},
        "integrated_pos_err_by_step": pos_by_step,
        "steps_per_horizon_step": per_dim["policy"]["count"].astype(int).tolist(),
    }


def _integrated_by_step(pred, target, mask) -> list[float]:
    """Mean integrated position error at each horizon step, over the samples valid there."""
    pos = integrated((pred - target)[..., POS], mask)
    count = mask.sum(axis=0)
    return [float(pos[:, h][mask[:, h]].mean()) if count[h] else float("nan") for h in range(mask.shape[1])]
