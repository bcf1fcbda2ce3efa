"""`vla-ds eval POLICY_OR_RUN`: open-loop metrics of a policy on held-out episodes, in physical units."""
from __future__ import annotations

import argparse
import logging

from vla_ds.cli.common import subcommand

log = logging.getLogger(__name__)


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="score a policy on held-out episodes: errors in robot units and degrees, vs yardsticks",
                   description="Predict every sample of the chosen episodes and compare with the recorded chunks: "
                               "MAE/RMSE per action dim and horizon step, the integrated position error after the "
                               "chunk, the share of steps within --tol, by sensor / no sensor and per episode, next "
                               "to zero motion and the training split's mean chunk. Writes eval.json, eval.md, "
                               "predictions.npz and PNGs. Runs under torchrun too (`torchrun --nproc_per_node N -m "
                               "vla_ds eval ...`: episodes split across ranks). See docs/evaluation.md.")
    p.add_argument("policy", metavar="POLICY_OR_RUN",
                   help="a run directory (its best, else final, else latest checkpoint), a checkpoint "
                        "(RUN/checkpoints/step_N or a pointer), a policy directory or a `vla-ds convert` output")
    p.add_argument("--data", nargs="+", default=argparse.SUPPRESS, metavar="DIR",
                   help="dataset directories (unset: the run's --data)")
    p.add_argument("--episodes", default="val",
                   help="val (the run's own validation split), all, or comma-separated episode ids")
    p.add_argument("--output-dir", default=argparse.SUPPRESS, metavar="DIR",
                   help="report directory, replaced whole (unset: RUN/eval/<step>, or eval/ beside the policy directory)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--tol", type=float, default=1.0,
                   help="radius (robot units) for 'within tol': the share of chunk steps whose integrated position "
                        "error is at most this")
    p.add_argument("--max-samples", type=int, default=0, help="score an evenly spaced subset of about this many (0: all)")
    p.add_argument("--backbone", default=argparse.SUPPRESS, metavar="PATH",
                   help="backbone directory, if it moved since training (unset: the one in the policy config)")
    p.add_argument("--cache-policy", choices=["auto", "off", "require"], default="auto",
                   help="a frozen-backbone policy reads the VL cache instead of running the backbone: when it matches "
                        "(auto), never (off), or always (require: refuse without one)")
    p.add_argument("--cache-dir", default=argparse.SUPPRESS, metavar="DIR", help="VL cache directory (unset: the run's)")
    p.add_argument("--other-stats", action="store_true",
                   help="evaluate although --data's stats.json differs from the policy's (other sessions)")
    p.add_argument("--max-plots", type=int, default=12, help="trajectory PNGs, one per episode")
    p.add_argument("--seed", type=int, default=0,
                   help="a flow head's starting noise (per sample: any batch size or world size gives the same chunks)")
    p.add_argument("--flow-steps", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="a flow head's Euler steps (unset: the policy's --flow-steps)")


def run(args: argparse.Namespace) -> int:
    from vla_ds.eval.run import EvalArgs, evaluate
    from vla_ds.utils.dist import process_group_cleanup

    eval_args = EvalArgs(policy=args.policy, data=list(getattr(args, "data", [])), episodes=args.episodes,
                         output_dir=getattr(args, "output_dir", None), batch_size=args.batch_size,
                         num_workers=args.num_workers, tol=args.tol, max_samples=args.max_samples,
                         backbone=getattr(args, "backbone", None), cache_policy=args.cache_policy,
                         cache_dir=getattr(args, "cache_dir", None), other_stats=args.other_stats,
                         max_plots=args.max_plots, seed=args.seed, flow_steps=getattr(args, "flow_steps", None))
    with process_group_cleanup():
        results = evaluate(eval_args)
    if "output_dir" in results:
        s = results["metrics"]["summary"]
        log.info("eval: final position error %.4g (zero motion %.4g, mean chunk %.4g); within tol %.1f%%",
                 s["policy"]["final_pos_err"], s["zero_motion"]["final_pos_err"], s["mean_chunk"]["final_pos_err"],
                 100 * s["policy"]["within_tol"])
    return 0
