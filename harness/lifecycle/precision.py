"""`train.precision=auto`: bf16 autocast or fp32, chosen by timing the run's own model on this device.

Whether bf16 autocast pays on a CPU depends on the CPU and on the model: on one Intel Xeon (AMX) a 4-layer
d_model 384 GPT-2 trained 2.3x faster in bf16 while the d_model 128 one was slower; on an AMD EPYC (AVX512-BF16)
small models gained nothing with the fp32-only fused head, and 1.07x-1.23x (two probes, 2026-12-01) of the
standard benchmark's model with its bf16 counterpart (models/base.py). So `auto` on a CPU times a few forward+backward passes of the model in both precisions (a copy
built from the same config, on a synthetic micro-batch of the run's shape, under a forked RNG: the run's own
weights, data order and random state are untouched) and takes bf16 only when it is at least BF16_MARGIN times
faster. On CUDA with bf16 support `auto` is bf16 autocast without a probe (the GPU default everywhere).

The choice and both measured rates go to env.json (`precision_probe`). A resumed run or a cooldown branch keeps
the precision its first launch recorded (never re-measured: one run, one precision); a benchmark measures once
and passes the choice to every run (bench/run.py), so the precision is part of its workload.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from runtime.device import autocast, resolve_precision, synchronize

# bf16 must win by this factor: its rounding costs accuracy, and differences within ~10% were timing noise on
# the shared 2-core machines this harness is developed on
BF16_MARGIN = 1.15


def probe(model_cfg: Any, micro_batch: int, seq_len: int, device: torch.device, seconds: float = 0.6,
          min_reps: int = 3) -> dict[str, Any]:
    """Tokens per second of forward+backward of a fresh model built from `model_cfg` in fp32 and under bf16
    autocast, interleaved step by step (a drift of the machine's load hits both), and the choice."""
    from models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(model_cfg).to(device)
        gen = torch.Generator().manual_seed(0)
        idx = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len + 1), generator=gen).to(device)
        x, y = idx[:, :-1], idx[:, 1:]
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}

        def step(precision: str) -> float:
            t0 = time.perf_counter()
            with autocast(device, precision):
                _, loss = model(x, y)
            loss.backward()
            synchronize(device)
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        for precision in times:  # warm-up: allocation, kernel choice
            step(precision)
        while min(len(v) for v in times.values()) < min_reps or sum(map(sum, times.values())) < seconds:
            for precision, seen in times.items():
                seen.append(step(precision))
    rates = {p: micro_batch * seq_len / statistics.median(v) for p, v in times.items()}
    choice = "bf16" if rates["bf16"] >= BF16_MARGIN * rates["fp32"] else "fp32"
    return {"choice": choice, "tokens_per_s": {p: round(r, 1) for p, r in rates.items()}, "margin": BF16_MARGIN,
            "reps": len(times["fp32"]), "micro_batch": micro_batch, "seq_len": seq_len}


def recorded(run_dir: Path) -> str | None:
    """The precision a run's first launch recorded in its env.json (None: no record)."""
    try:
        return json.loads((run_dir / "env.json").read_text()).get("precision")
    except (OSError, ValueError):
        return None


def choose(precision: str, device: torch.device, model_cfg: Any, micro_batch: int, seq_len: int,
           resumed_from: Path | None, world: int) -> tuple[str, dict[str, Any] | None]:
    """(the run's precision, the probe's record or None). `resumed_from`: the run directory of the checkpoint
    this launch continues or branches from."""
    if precision != "auto" or device.type != "cpu":
        return resolve_precision(precision, device), None
    if resumed_from is not None and (before := recorded(resumed_from)) is not None:
        return before, {"choice": before, "kept_from": str(resumed_from)}
    if world > 1:  # ranks timing themselves could choose differently; multi-process CPU runs test the code path
        return "fp32", {"choice": "fp32", "reason": f"{world} processes on a CPU: not probed"}
    result = probe(model_cfg, micro_batch, seq_len, device)
    return result["choice"], result
