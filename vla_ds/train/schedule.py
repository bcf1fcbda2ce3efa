"""Learning-rate schedule: linear warm-up, hold, cosine decay to --min-lr; every group scaled alike.

multiplier(s) over S steps (W = round(warmup_ratio*S), H = round(hold_ratio*S)):
    s < W          (s + 1) / W                      linear warm-up (never exactly 0)
    s < W + H      1                                hold at the peak
    otherwise      f + (1 - f) * (1 + cos(pi * p)) / 2,   p = (s - W - H) / (S - W - H)
with floor f = min_lr / lr. Each parameter group's lr is its own base lr x multiplier(s), so the
action expert decays exactly to --min-lr and the sensor / VL / vision groups keep their ratios to
it. "Steps" are optimizer steps (--sched-on step) or epochs (--sched-on epoch).
"""
from __future__ import annotations

import math


def lr_multiplier(step: int, total: int, warmup_ratio: float, hold_ratio: float, floor: float) -> float:
    total = max(int(total), 1)
    warmup = round(warmup_ratio * total)
    hold = round(hold_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + hold:
        return 1.0
    decay = max(total - warmup - hold, 1)
    p = min((step - warmup - hold) / decay, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


class GroupLRSchedule:
    """Sets `group["lr"] = base_lr[group] * lr_multiplier(step)` on any object with `param_groups`
    (a torch optimizer or DeepSpeed's ZeRO wrapper). State is JSON-serializable."""

    def __init__(self, optimizer, total: int, warmup_ratio: float, hold_ratio: float, floor: float):
        self.optimizer = optimizer
        self.total, self.warmup_ratio, self.hold_ratio, self.floor = int(total), warmup_ratio, hold_ratio, floor
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, base in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = base
        self.step_count = 0
        self.rewarm_start, self.rewarm_steps = 0, 0
        self._apply()

    def multiplier(self, step: int | None = None) -> float:
        s = self.step_count if step is None else step
        m = lr_multiplier(s, self.total, self.warmup_ratio, self.hold_ratio, self.floor)
        if self.rewarm_steps and s >= self.rewarm_start:
            m *= min(1.0, (s - self.rewarm_start + 1) / self.rewarm_steps)
        return m

    def rewarm(self, fraction: float = 0.03) -> int:
        """Ramp the lr linearly back up to the schedule over `fraction` of the remaining steps
        (the old trainer did this on every resume; vla-ds only with --rewarm). Returns the steps."""
        self.rewarm_start = self.step_count
        self.rewarm_steps = max(1, round(fraction * max(self.total - self.step_count, 0)))
        self._apply()
        return self.rewarm_steps

    def _apply(self) -> None:
        m = self.multiplier()
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * m

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total": self.total, "base_lrs": list(self.base_lrs),
                "rewarm": [self.rewarm_start, self.rewarm_steps]}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.total = int(state["total"])
        self.base_lrs = list(state["base_lrs"])
        self.rewarm_start, self.rewarm_steps = state.get("rewarm", [0, 0])
        self._apply()
