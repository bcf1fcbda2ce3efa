"""The profile's outputs in the run directory: profile.json, a Markdown row, and a PNG chart."""
from __future__ import annotations

from pathlib import Path

from vla_ds.profiling.memory import GIB

PHASES = ("model_load", "engine_init", "forward", "backward", "optimizer_step")

MARKDOWN_HEADER = (
    "| run | finetune | ds config | micro-batch | procs | precision | peak GiB | params | grads | optim (accel) "
    "| optim (host) | other | activations | host RSS GiB | samples/s |\n"
    "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _gib(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def finetune_label(result: dict) -> str:
    mode = result["finetune_vl"]
    return f"{mode} 8-bit" if result.get("load_in_8bit") else mode


def markdown_row(result: dict) -> str:
    """One table row (under MARKDOWN_HEADER); per-rank figures are the largest rank's."""
    s = result["summary"]
    peak = _gib(s["peak_gib"])
    if result["status"] != "ok":
        peak = f"OOM ({result.get('error', '')[:40]})"
    sps = s.get("samples_per_s")
    cells = [
        result["label"], finetune_label(result), Path(result["ds_config"]).stem, str(result["micro_batch"]),
        str(result["world_size"]), result["precision"], peak, _gib(s.get("parameters_accelerator_gib")),
        _gib(s.get("gradients_accelerator_gib")), _gib(s.get("optimizer_states_accelerator_gib")),
        _gib(s.get("optimizer_states_host_gib")), _gib(s.get("other_accelerator_gib")), _gib(s.get("activations_gib")),
        _gib(s.get("host_rss_peak_gib")), "–" if sps is None else f"{sps:.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


def write_chart(result: dict, path: Path) -> Path:
    """Peak per phase (left) and the model states + activations of each rank (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vla_ds.utils.io import atomic_file

    key = "reserved" if result["memory_source"] == "cuda_allocator" else "rss"
    fig, (ax_phase, ax_kind) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in result["ranks"]:
        phases = [p for p in PHASES if p in r["phases"]]
        ax_phase.plot(phases, [r["phases"][p][key] / GIB for p in phases], "o-", label=f"rank {r['rank']}")
    ax_phase.set_ylabel(f"peak GiB ({'CUDA reserved' if key == 'reserved' else 'process RSS'})")
    ax_phase.set_title("peak memory per phase")
    ax_phase.tick_params(axis="x", rotation=20)
    ax_phase.legend()
    parts = [("parameters", "accelerator"), ("gradients", "accelerator"), ("optimizer_states", "accelerator"),
             ("other", "accelerator"), ("optimizer_states", "host"), ("parameters", "host"), ("gradients", "host")]
    ranks = [r for r in result["ranks"] if "model_states" in r]
    x = [f"rank {r['rank']}" for r in ranks]
    bottom = [0.0] * len(ranks)
    for kind, place in parts:
        vals = [r["model_states"][kind][place] / GIB for r in ranks]
        if any(vals):
            ax_kind.bar(x, vals, bottom=bottom, label=f"{kind} ({place})", hatch="//" if place == "host" else None)
            bottom = [b + v for b, v in zip(bottom, vals)]
    acts = [r["activations"] / GIB for r in ranks]
    ax_kind.bar(x, acts, bottom=bottom, label="activations (remainder)", color="lightgrey")
    ax_kind.set_ylabel("GiB")
    ax_kind.set_title("model states and activations")
    ax_kind.legend(fontsize=7)
    fig.suptitle(f"{result['label']}: {finetune_label(result)}, {Path(result['ds_config']).stem}, "
                 f"micro-batch {result['micro_batch']}, {result['world_size']} proc ({result['device']})", fontsize=9)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def write_reports(result: dict, run_dir: Path, suffix: str = "") -> dict[str, Path]:
    from vla_ds.utils.io import atomic_file, write_json

    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / f"profile{suffix}.json", "md": run_dir / f"profile{suffix}.md",
             "png": run_dir / f"profile{suffix}.png"}
    write_json(paths["json"], result)
    with atomic_file(paths["md"]) as f:
        f.write(MARKDOWN_HEADER + "\n" + markdown_row(result) + "\n")
    write_chart(result, paths["png"])
    return paths
