"""Device, precision and compile choices, made from measurements rather than assumptions.

bf16 is not uniformly fast on CPUs: some run bf16 matmuls ~100x slower than fp32 (no native support,
measured 1 vs 176 GFLOP/s), others (AVX512-BF16/AMX) faster. `matmul_rates()` measures both on the device
once per process; `bf16_is_fast()` is what numerics that would run in bf16 on a GPU (e.g. Newton-Schulz)
consult to pick their dtype. Whether the training forward runs under bf16 autocast is decided by timing the
model itself (train.precision=auto, harness/lifecycle/precision.py), or set (fp32 | bf16).
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} requested but CUDA is not available")
    return dev


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def matmul_rates(device_str: str, n: int = 512, seconds: float = 0.1) -> dict[str, float]:
    """Measured square-matmul throughput in GFLOP/s for fp32 and bf16 on the device."""
    device = torch.device(device_str)
    rates = {}
    gen = torch.Generator().manual_seed(0)  # a private generator: the probe must not shift the global RNG
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        a @ b  # warm-up (kernel selection, allocation)
        synchronize(device)
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            synchronize(device)
            if time.perf_counter() - t0 >= seconds and reps >= 3:
                break
        rates[str(dtype).removeprefix("torch.")] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    return rates


def bf16_is_fast(device: torch.device) -> bool:
    """True when bf16 matmuls run at least at half the fp32 rate on this device (always on CUDA with bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    r = matmul_rates(str(device), 512)  # the arguments train.py uses, so the cached measurement is shared
    return r["bfloat16"] >= 0.5 * r["float32"]


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 autocast on CUDA with bf16 support, fp32 elsewhere (CPU autocast is opt-in)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
