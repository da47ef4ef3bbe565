"""The tuning search, identical for every arm (docs/protocol.md v2, "the controlled budget").

Both methods are pure functions of the declaration and of the losses already recorded, so a benchmark that is
re-launched recomputes the same trials and runs only the missing ones.

    coordinate  Marin's coordinate descent: start at the defaults; take one axis at a time and evaluate the
                grid points one step either way of the current best; move to the best; next axis. When every
                neighbour of the best point is evaluated and trials remain, the steps are halved (in log) and
                the descent goes on. Exactly `trials` evaluations.
    qmc         AlgoPerf's quasi-random search: `trials` points of a scrambled Halton sequence (scipy.stats.qmc,
                the same points of the unit cube for every arm with the same number of axes), log-uniform or
                uniform on each axis.

A diverged trial counts as a trial and ranks last. `certificate_points` gives the neighbours (one declared
grid step either way on every axis) of the chosen point: the local-optimality certificate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from scipy.stats import qmc

from bench.declaration import Axis, round_value

Setting = dict[str, float]


def knob(key: str) -> str:
    """A tuned key as ids and tables print it: `optimizer.lr` -> `lr`; any other key in full (`hybrid.lr`)."""
    return key.removeprefix("optimizer.")


def setting_id(setting: Setting) -> str:
    """A readable, unique id: `lr=0.003,weight_decay=0.1,hybrid.lr=0.001`."""
    return ",".join(f"{knob(k)}={v:g}" for k, v in setting.items()) or "default"


def qmc_points(space: dict[str, Axis], trials: int, seed: int) -> list[Setting]:
    """`trials` scrambled-Halton points mapped onto the axes."""
    keys = list(space)
    unit = qmc.Halton(d=len(keys), scramble=True, seed=seed).random(trials)
    return [{k: space[k].from_unit(float(u)) for k, u in zip(keys, row)} for row in unit]


def coordinate_rounds(space: dict[str, Axis], trials: int,
                      loss: Callable[[Setting], float | None]) -> tuple[list[list[Setting]], bool]:
    """The rounds of coordinate descent so far: each round a list of settings to evaluate together. `loss(s)`
    returns the recorded final loss of s (inf for diverged), or None while it is not run yet. Returns the rounds
    up to and including the first with an unrun setting, and whether the search is complete."""
    keys = list(space)
    best = {k: round_value(space[k].default) for k in keys}
    seen: dict[str, Setting] = {}
    rounds: list[list[Setting]] = []
    axis, level, idle = 0, 0, 0

    def budget_left() -> int:
        return trials - len(seen)

    # the first round: the defaults and their neighbours on the first axis (needed whatever the defaults score)
    first = space[keys[0]].neighbours(best[keys[0]]) if keys else ()
    pending = [best, *({**best, keys[0]: v} for v in first if v is not None)]
    axis = 1 % len(keys) if keys else 0
    while True:
        batch = [s for s in pending if setting_id(s) not in seen][:budget_left()]
        if batch:
            rounds.append(batch)
            for s in batch:
                seen[setting_id(s)] = s
            losses = [loss(s) for s in batch]
            if any(v is None for v in losses):
                return rounds, False
            idle = 0
        else:
            idle += 1
        if budget_left() <= 0:
            return rounds, True
        scored = [(_score(loss(s)), setting_id(s), s) for s in seen.values()]
        best = min(scored)[2]
        if idle > len(keys):  # every neighbour of the best point is evaluated: refine the grid
            level, idle = level + 1, 0
        pending = [{**best, keys[axis]: v} for v in space[keys[axis]].neighbours(best[keys[axis]], level)
                   if v is not None]
        axis = (axis + 1) % len(keys)
        if level > 30:  # a degenerate space (every point seen at every refinement): stop
            return rounds, True


def _score(v: float | None) -> float:
    return math.inf if v is None or not math.isfinite(v) else v


def certificate_points(space: dict[str, Axis], chosen: Setting) -> list[tuple[str, str, Setting | None]]:
    """(axis, "down" | "up", neighbour setting or None at the edge of the range) on every tuned axis, at the
    declared grid step."""
    out = []
    for k, ax in space.items():
        down, up = ax.neighbours(chosen[k])
        out += [(k, "down", None if down is None else {**chosen, k: down}),
                (k, "up", None if up is None else {**chosen, k: up})]
    return out
