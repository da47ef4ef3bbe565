"""scripts/perf.py's workload and clock (it and scripts/gpu_check.py import them; not a command of its own).

The presets (model and global batch), the measured optimizer names (every conf/optimizer/*.yaml, the user's,
and the variants), one prepared run per preset and optimizer with a fixed random global batch (Setup: what
train.py would build, in a throw-away run directory), the clock (timed; rounds: the repeats interleaved,
medians over rounds) and the model FLOPs utilisation against the measured and the datasheet matmul rate.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from harness.config import search
from harness.config.schema import register_configs
from harness.lifecycle.prepare import CompleteRun, prepare_run
from runtime.device import autocast, matmul_rates, synchronize

# Presets: model and global batch (sequences x tokens); micro = global (no accumulation) unless given.
PRESETS = {
    "cpu_tiny": ["model=gpt2_micro", "train.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=16"],
    "cpu_small": ["model=gpt2_tiny", "train.seq_len=256", "train.global_batch_size=32",
                  "train.micro_batch_size=32"],
    "gpt2_124m": ["model=gpt2_124m", "train.seq_len=1024", "train.global_batch_size=32",
                  "train.micro_batch_size=16"],
}
# Measured entries that are another entry's conf/optimizer/*.yaml with overrides: Muon with its Newton-Schulz in
# fp32 (dtype: auto runs it in bf16 where bf16 matmuls measure fast), the like-for-like reference for PolarGrad,
# whose QDWH runs in fp32/fp64 (no bf16 QR or Cholesky).
VARIANTS = {"muon_fp32": ("muon", ("optimizer.dtype=fp32",))}


def optimizer_names() -> list[str]:
    """Every conf/optimizer/*.yaml and the user's (OPTBENCH_CONFIG_PATH; AdamW, the reference, first), each variant
    after its base."""
    names = search.options("optimizer")
    names = ["adamw", *(n for n in names if n != "adamw")]
    for variant, (base, _) in VARIANTS.items():
        names.insert(names.index(base) + 1, variant)
    return names


# preset -> the precision its first run in this process resolved (train.precision=auto probes on a CPU): every
# later Setup of the preset gets it explicitly, so that the optimizers, the PC layer and the references are
# timed in one precision even where the probe sits near its margin and could choose differently run to run
PRECISION: dict[str, dict] = {}  # preset -> {"precision", "probe"} (the probe's record, None on CUDA)


def compose_run(preset: str, optimizer: str, extra: tuple[str, ...] = ()):
    """The run train.py would prepare for this preset and optimizer (conf/ composed by Hydra, prepare_run), in a
    throw-away run directory: the same checks, model, parameter split, optimizer, precision and compile choice
    (the precision: the preset's first choice in this process, PRECISION)."""
    base, overrides = VARIANTS.get(optimizer, (optimizer, ()))
    register_configs()
    overrides = [*PRESETS[preset], f"optimizer={base}", "logger=none", "name=perf", *overrides, *extra]
    auto = not any(o.startswith("train.precision=") for o in overrides)
    if auto and preset in PRECISION:
        overrides.append(f"train.precision={PRECISION[preset]['precision']}")
    overrides = search.with_user_dirs(overrides)
    with initialize_config_dir(config_dir=str(search.CONF), version_base="1.3", job_name="perf"):
        dcfg = compose("config", overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run = prepare_run(dcfg, Path(tmp) / "run")
        assert not isinstance(run, CompleteRun)
        run.lock.release(remove=True)
    if auto:
        PRECISION.setdefault(preset, {"precision": run.precision, "probe": run.precision_probe})
    return run


class Setup:
    """One prepared run's model and optimizer, with a fixed random global batch (timing needs no data)."""

    def __init__(self, preset: str, optimizer: str, extra: tuple[str, ...] = ()):
        self.run = run = compose_run(preset, optimizer, extra)
        t = run.cfg.train
        self.cfg, self.model, self.split, self.opt = run.cfg, run.model, run.split, run.optimizer
        self.hooks = run.input_hooks
        self.device, self.precision, self.compiled, self.accum = run.device, run.precision, run.compile, run.grad_accum
        self.fast = torch.compile(self.model) if self.compiled else self.model
        gen = torch.Generator().manual_seed(1)
        self.batches = [torch.randint(0, self.cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1),
                                      generator=gen).to(self.device) for _ in range(self.accum)]
        self.tokens = run.tokens_per_step
        self.steps = 0
        self.matrix = any("backend" in g for g in self.opt.param_groups)  # an orthogonalizing method

    def fwd_bwd(self, model=None) -> None:
        model = model or self.fast
        for b in self.batches:
            with autocast(self.device, self.precision):
                _, loss = model(b[:, :-1], b[:, 1:])
            (loss / self.accum).backward()

    def step(self) -> None:
        self.opt.step()
        self.steps += 1

    def train_step(self) -> None:
        """The bare loop: forward+backward, clip, step, zero_grad (what train.py's clock also covers)."""
        self.fwd_bwd()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.model.after_optimizer_step()
        self.opt.zero_grad(set_to_none=True)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def rounds(items: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each callable, the repeats interleaved (one of each per round), after one warm-up."""
    for fn in items.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in items}
    for _ in range(repeats):
        for k, fn in items.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, without sparsity), for MFU on a GPU.
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.5, "H100": 989.4, "A100": 312.0}


def datasheet_peak(name: str) -> float | None:
    """The datasheet bf16 TFLOP/s of the GPU `name` (torch.cuda.get_device_name) names, or None."""
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)


def mfu(flops: float, seconds: float, precision: str, device: torch.device) -> dict:
    """Model FLOPs utilisation of forward+backward: against this device's measured dense-matmul rate in the
    run's precision (512^2 matmuls on a CPU, as train.py; 4096^2 on a GPU, where 512^2 is far from its peak),
    and on a known GPU against its datasheet bf16 peak (None elsewhere)."""
    n = 4096 if device.type == "cuda" else 512
    rate = matmul_rates(str(device), n)["bfloat16" if precision == "bf16" else "float32"] * 1e9
    achieved = flops / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = datasheet_peak(name)
    return {"model_tflops": achieved / 1e12, "mfu_vs_measured_matmul": achieved / rate,
            "mfu_vs_datasheet_bf16": achieved / (peak * 1e12) if peak and precision == "bf16" else None,
            "device_name": name or None}

