"""The training loop's own state: where it is, its clocks, its divergence watch, all of it in the checkpoint.

One training clock runs from the first step to the last and is paused, explicitly, around what is not
training (evaluation, diagnostics, checkpoints), the way modded-nanogpt times its records; the optimizer's
step() has a clock of its own inside it (docs/protocol.md: the optimizer's overhead), diagnostics one outside it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from runtime.device import synchronize


class Clock:
    """Seconds accumulated while running: `resume()` ... `pause()`, or `with clock.running():` /
    `with clock.paused():`. The device is synchronized at each edge, so queued GPU work is charged to the
    side that queued it."""

    def __init__(self, device: torch.device, seconds: float = 0.0):
        self.device, self.seconds, self._since = device, seconds, None

    def resume(self) -> None:
        synchronize(self.device)
        self._since = time.perf_counter()

    def pause(self) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._since
        self._since = None

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self.resume()
        try:
            yield
        finally:
            self.pause()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def read(self) -> float:
        """The seconds so far, the running stretch included (no synchronization: a reading, not an edge)."""
        return self.seconds + (time.perf_counter() - self._since if self._since is not None else 0.0)


@dataclass
class LoopState:
    """Updates done, the clocks, the optimizer's matmul FLOPs per step (counted at step 1; decompositions are
    not counted) and the divergence watch (docs/protocol.md rule 6): a training loss above `blowup` = diverge_factor
    x the initial loss for diverge_patience consecutive steps, or a non-finite one, ends the run."""

    device: torch.device
    step: int = 0
    train: Clock = field(init=False)
    optimizer: Clock = field(init=False)
    diagnostics: Clock = field(init=False)
    opt_flops: int = 0
    blowup: float = math.inf
    over: int = 0  # consecutive steps above blowup

    def __post_init__(self) -> None:
        self.train, self.optimizer, self.diagnostics = (Clock(self.device) for _ in range(3))

    def state_dict(self) -> dict[str, float | int]:
        """The checkpoint's "loop" entry (its step is the checkpoint's own)."""
        return {"train_time": self.train.seconds, "opt_time": self.optimizer.seconds, "opt_flops": self.opt_flops,
                "blowup": self.blowup, "over": self.over, "diag_time": self.diagnostics.seconds}

    def load_state_dict(self, step: int, loop: dict[str, float | int]) -> None:
        self.step, self.opt_flops, self.blowup, self.over = step, loop["opt_flops"], loop["blowup"], loop["over"]
        self.train.seconds, self.optimizer.seconds = loop["train_time"], loop["opt_time"]
        self.diagnostics.seconds = loop.get("diag_time", 0.0)

    def watch(self, train_loss: float, factor: float, patience: int) -> str | None:
        """One step of the divergence watch: why the run has diverged, or None. Without a step-0 evaluation the
        first training loss sets `blowup`."""
        if not math.isfinite(train_loss):
            return f"non-finite training loss ({train_loss})"
        if not math.isfinite(self.blowup):
            self.blowup = factor * train_loss
        self.over = self.over + 1 if train_loss > self.blowup else 0
        if self.over >= patience:
            return (f"training loss above {factor} x the initial loss ({self.blowup:.3f}) for {self.over} "
                    f"consecutive steps (last {train_loss:.3f})")
        return None
