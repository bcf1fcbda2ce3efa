"""The PNGs of an evaluation (matplotlib, Agg: files only). See `vla_ds.eval.report` for the list."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from vla_ds.eval.metrics import ANG, DIM_UNITS, POS, PROGRESS, final_errors

MIN_SPAN = 1.0  # robot units or degrees: the least y range of a trajectory panel
COLORS = {"policy": "C0", "zero_motion": "C7", "mean_chunk": "C1"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    _plt().close(fig)


def plot_errors(results: dict, path: Path) -> None:
    """Per-step MAE of position, angle and progress, and the integrated position error, vs horizon step."""
    plt = _plt()
    m = results["metrics"]
    steps = np.arange(1, results["horizon"] + 1)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    panels = (("position MAE per step (units)", POS), ("angle MAE per step (deg)", ANG),
              ("progress MAE", slice(PROGRESS, PROGRESS + 1)))
    for ax, (title, dims) in zip(axes, panels):
        for name, errs in m["per_dim_step"].items():
            mae = np.asarray(errs["mae"], dtype=float)[:, dims].mean(axis=1)
            ax.plot(steps, mae, "o-", color=COLORS[name], label=name, markersize=3)
        ax.set_title(title, fontsize=10)
    for name, curve in m["integrated_pos_err_by_step"].items():
        axes[3].plot(steps, np.asarray(curve, dtype=float), "o-", color=COLORS[name], label=name, markersize=3)
    axes[3].axhline(results["tol"], color="k", lw=0.8, ls="--", label=f"tol {results['tol']:g}")
    axes[3].set_title("integrated position error (units)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("horizon step")
        ax.grid(alpha=0.3)
    axes[3].legend(fontsize=8)
    fig.suptitle(f"error vs horizon step: {results['samples']} samples, {len(results['episode_ids'])} episodes",
                 fontsize=11)
    _save(fig, path)


def plot_histogram(results: dict, preds, path: Path) -> None:
    from vla_ds.eval.metrics import baselines

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    chunk = np.asarray(results["mean_chunk"], dtype=float)
    series = {"policy": preds.pred, **baselines(preds.target, chunk)}
    errs = {name: final_errors((p - preds.target)[..., POS], preds.mask) for name, p in series.items()}
    top = max(float(e.max()) if len(e) else 0.0 for e in errs.values()) or 1.0
    bins = np.linspace(0, top, 30)
    for name, e in errs.items():
        ax.hist(e, bins=bins, histtype="step", lw=1.6, color=COLORS[name], label=f"{name} (mean {e.mean():.3g})")
    ax.axvline(results["tol"], color="k", lw=0.8, ls="--", label=f"tol {results['tol']:g}")
    ax.set_xlabel(f"position error after the chunk ({results['horizon']} steps, robot units)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]


def plot_trajectories(preds, directory: Path, max_plots: int) -> None:
    """One PNG per episode (the first `max_plots`): each pose coordinate over the episode's frames, as
    recorded (the first step of each sample's recorded chunk, integrated) and as predicted (each chunk
    drawn from the recorded pose at its start frame, every H-th sample so chunks do not overlap). Frames
    left out of the evaluation (--max-samples) are bridged: the recorded line is then approximate."""
    plt = _plt()
    directory.mkdir(parents=True, exist_ok=True)
    episodes = list(dict.fromkeys(preds.episode_ids))[:max_plots]
    ep_of = np.asarray(preds.episode_ids)
    frames = np.asarray([int(s.rsplit(":", 1)[1]) for s in preds.sample_ids])
    horizon = preds.pred.shape[1]
    for ep in episodes:
        idx = np.nonzero(ep_of == ep)[0]
        idx = idx[np.argsort(frames[idx])]
        t = frames[idx]
        recorded = np.cumsum(np.concatenate([np.zeros((1, 6)), preds.target[idx, 0, :6]]), axis=0)  # pose at t and t+1
        fig, axes = plt.subplots(2, 4, figsize=(15, 6), sharex=True)
        for d, ax in enumerate(axes.flat[:7]):
            unit = f" ({DIM_UNITS[d]})" if DIM_UNITS[d] else ""
            label = ("x", "y", "z", "a", "b", "r", "progress")[d]
            if d == PROGRESS:
                ax.plot(t + 1, preds.target[idx, 0, d], "k-", lw=1.2, label="recorded")
            else:
                ax.plot(np.append(t, t[-1] + 1), recorded[:, d], "k-", lw=1.2, label="recorded")
            for j in range(0, len(idx), horizon):
                i, m = idx[j], preds.mask[idx[j]]
                steps = t[j] + 1 + np.arange(horizon)[m]
                if d == PROGRESS:
                    path = preds.pred[i, m, d]
                else:  # from the recorded pose at the chunk's start frame
                    steps = np.concatenate([[t[j]], steps])
                    path = recorded[j, d] + np.concatenate([[0.0], np.cumsum(preds.pred[i, m, d])])
                ax.plot(steps, path, "-", color="C0", lw=1.0, label="predicted chunk" if j == 0 else None)
                if d != PROGRESS:
                    ax.plot([t[j]], [recorded[j, d]], "o", color="C3", markersize=3,
                            label="chunk start" if j == 0 else None)
            ax.set_title(f"{label}{unit}", fontsize=10)
            ax.grid(alpha=0.3)
            low, high = ax.get_ylim()
            if d != PROGRESS and high - low < MIN_SPAN:  # a still coordinate: do not blow its noise up
                mid = (low + high) / 2
                ax.set_ylim(mid - MIN_SPAN / 2, mid + MIN_SPAN / 2)
        axes.flat[7].axis("off")
        axes.flat[0].legend(fontsize=8)
        for ax in axes[1]:
            ax.set_xlabel("frame")
        sensed = "with sensor" if preds.has_sensor[idx].any() else "no sensor"
        fig.suptitle(f"{ep} ({sensed}, {len(idx)} samples): pose relative to its first frame", fontsize=11)
        _save(fig, directory / f"{_safe(ep)}.png")
