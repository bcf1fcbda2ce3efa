"""`vla-ds plot RUN_DIR`: loss and learning-rate curves of a run as PNG, from metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

from vla_ds.train.metrics import read_metrics


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/curves.png (or `out`): train/val losses on a log scale, and every lr group."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training nodes
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for key, style in (("train/loss_step", "-"), ("train/loss_epoch", "o-"), ("val/loss_epoch", "s-"),
                       ("val/loss_sensor", "^--"), ("val/loss_nosensor", "v--")):
        x, y = series(rows, key)
        if x:
            ax_loss.plot(x, y, style, label=key, markersize=4)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (normalized actions)")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    lr_keys = sorted({k for r in rows for k in r if k.startswith("lr/")})
    for key in lr_keys:
        x, y = series(rows, key)
        ax_lr.plot(x, y, label=key)
    ax_lr.set_yscale("log")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    if lr_keys:
        ax_lr.legend(fontsize=8)
    ax_lr.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    from vla_ds.utils.io import atomic_file

    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return out
